"""Structured (channel / neuron) pruning helpers shared by `gfs` and `sdprun`.

A *channel group* is a set of channels that can be removed physically and exactly: the output
channels of a producer layer (Linear, or Conv2d with groups = 1) that flow, through channel-wise
operations only, into exactly one consumer layer (Linear, or Conv2d with groups = 1):

  producer -> [BatchNorm | depthwise Conv2d | ReLU/ReLU6/... | pooling | dropout | flatten of 1x1]* -> consumer

Groups are found on the torch.fx graph of the model: every node on the path must have a single
user, so channels that also feed a residual addition (ResNet block outputs), a concatenation or
the logits are never grouped. This covers MLP hidden units, the inner channels of ResNet basic
and bottleneck blocks, the expanded channels of MobileNetV2 inverted residuals (through the
depthwise conv), the pointwise outputs of MobileNetV1 (through the next depthwise conv) and VGG
convs. Every activation on the path maps 0 to 0, so a channel whose producer row, biases and
BN affine parameters are zero is exactly zero at the consumer.

Operations:
  find_channel_groups(model, example)    the groups, in forward order
  find_groups(model, example)            the same, a ConfigError when there are none (sDprun, GFS)
  example_input(ctx)                     one calibration example on the run's device, for tracing
  ChannelMasker                          per-group channel scales applied to the consumer's input
                                         (forward pre-hooks): GFS's alpha-mask
  shrink(model, groups, keep, scale)     a physically smaller copy (scale folded into the consumer)
  zero_out(model, groups, keep, scale)   the same function, same shapes: dead channels zeroed
  group_members(model, group)            (parameter, channel dim) slices of one group (sDprun)
  SuffixRunner                           caches the consumer's input and re-runs only the part of
                                         the graph downstream of it, for many channel scalings at once
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from pruning import flops
from pruning.errors import ConfigError
from pruning.layout import ParamLayout, make_layout

_PASS_MODULES = (nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Hardswish, nn.ELU,
                 nn.Identity, nn.Dropout, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
                 nn.AdaptiveMaxPool2d)
_PASS_FUNCTIONS = {F.relu, torch.relu, F.relu6, F.hardtanh, F.leaky_relu, F.gelu, F.silu, F.hardswish,
                   F.elu, F.dropout, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d,
                   F.adaptive_max_pool2d, torch.nn.functional.relu_}
_PASS_METHODS = {"relu", "relu_"}
_RESHAPES_FN = {torch.flatten}
_RESHAPES_METHOD = {"view", "reshape", "flatten"}
_SHAPE_ONLY_METHODS = {"size", "dim"}


@dataclass(frozen=True)
class ChannelGroup:
    """Channels of `producer` feeding only `consumer`, through the channel-wise modules `chain`."""

    name: str                     # the producer's module name (unique per group)
    producer: str
    chain: tuple[str, ...]        # modules with per-channel parameters on the path (BN, depthwise conv)
    consumer: str
    size: int                     # number of channels D
    input_node: str               # fx node feeding the consumer (the masked activation)
    consumer_node: str


def _is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups == m.in_channels == m.out_channels and m.groups > 1


def _is_dense_layer(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1)


def _width(m: nn.Module) -> int:
    return int(m.out_features if isinstance(m, nn.Linear) else m.out_channels)


def _real_users(node: fx.Node) -> list[fx.Node]:
    """Users that consume the values (not only the shape) of `node`."""
    out = []
    for u in node.users:
        if u.op == "call_method" and u.target in _SHAPE_ONLY_METHODS:
            continue
        if u.op == "call_function" and u.target is getattr and len(u.args) > 1 and u.args[1] == "shape":
            continue
        out.append(u)
    return out


def _keeps_channels(node: fx.Node, src: fx.Node) -> bool:
    """A reshape node maps channel c of `src` to feature c (trailing dims of size 1)."""
    a, b = src.meta.get("tensor_meta"), node.meta.get("tensor_meta")
    if a is None or b is None or not hasattr(a, "shape") or not hasattr(b, "shape"):
        return False
    sa, sb = tuple(a.shape), tuple(b.shape)
    return len(sb) == 2 and len(sa) >= 2 and sa[:2] == sb and math.prod(sa[2:]) == 1


def trace(model: nn.Module) -> fx.GraphModule:
    """fx graph of `model`; the GraphModule shares the model's submodules (same objects)."""
    return fx.symbolic_trace(model)


def find_channel_groups(model: nn.Module, example: torch.Tensor,
                        gm: fx.GraphModule | None = None) -> list[ChannelGroup]:
    """All removable channel groups of `model`, in forward order (see the module docstring)."""
    gm = gm if gm is not None else trace(model)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        ShapeProp(gm).propagate(example)
    model.train(was_training)
    modules = dict(gm.named_modules())
    groups: list[ChannelGroup] = []
    for cnode in gm.graph.nodes:
        if cnode.op != "call_module" or not _is_dense_layer(modules[cnode.target]) or not cnode.args:
            continue
        inp = cnode.args[0]
        if not isinstance(inp, fx.Node):
            continue
        node, chain, ok, producer = inp, [], True, None
        while ok:
            users = _real_users(node)
            if len(users) != 1:
                ok = False
                break
            if node.op == "call_module":
                m = modules[node.target]
                if _is_dense_layer(m):
                    producer = node
                    break
                if _is_depthwise(m) or (isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) and m.affine):
                    chain.append(node.target)
                elif isinstance(m, nn.Flatten):
                    ok = _keeps_channels(node, node.args[0])
                elif not isinstance(m, _PASS_MODULES):
                    ok = False
            elif node.op == "call_function":
                if node.target in _RESHAPES_FN:
                    ok = _keeps_channels(node, node.args[0])
                elif node.target not in _PASS_FUNCTIONS:
                    ok = False
            elif node.op == "call_method":
                if node.target in _RESHAPES_METHOD:
                    ok = _keeps_channels(node, node.args[0])
                elif node.target not in _PASS_METHODS:
                    ok = False
            else:
                ok = False
            if ok:
                nxt = node.args[0] if node.args else None
                ok = isinstance(nxt, fx.Node)
                node = nxt
        if not ok or producer is None:
            continue
        pm = modules[producer.target]
        cm = modules[cnode.target]
        width = _width(pm)
        c_in = int(cm.in_features if isinstance(cm, nn.Linear) else cm.in_channels)
        if c_in != width or any(_width_of(modules[c]) != width for c in chain):
            continue
        groups.append(ChannelGroup(name=producer.target, producer=producer.target, chain=tuple(reversed(chain)),
                                   consumer=cnode.target, size=width, input_node=inp.name,
                                   consumer_node=cnode.name))
    return groups


def traced(model: nn.Module, key: str = "model") -> fx.GraphModule:
    """`trace(model)`, or a ConfigError naming `key` when torch.fx cannot trace it."""
    try:
        return trace(model)
    except Exception as exc:
        raise ConfigError(key, type(model).__name__, "an fx-traceable model (torch.fx.symbolic_trace)",
                          f"cannot be traced ({type(exc).__name__}: {exc})") from exc


def find_groups(model: nn.Module, example: torch.Tensor, key: str = "model",
                gm: fx.GraphModule | None = None) -> list[ChannelGroup]:
    """Channel groups of the model; a ConfigError when it has none (or cannot be traced)."""
    gm = gm if gm is not None else traced(model, key)
    try:  # shape propagation runs the model on the example
        groups = find_channel_groups(model, example, gm)
    except Exception as exc:
        raise ConfigError(key, type(model).__name__, "an fx-traceable model (torch.fx.symbolic_trace)",
                          f"cannot be traced ({type(exc).__name__}: {exc})") from exc
    if not groups:
        raise ConfigError(key, type(model).__name__, "a model with removable channels (Linear/Conv2d "
                          "outputs feeding one Linear/Conv2d through channel-wise ops)", "has no channel group")
    return groups


def example_input(ctx: Any) -> torch.Tensor:
    """One calibration example, batch of 1, on the run's device (for tracing and FLOPs), from a
    train-time method's context (`ctx.data.calib`, `ctx.device`)."""
    x = ctx.data.calib[0][0]
    return torch.as_tensor(x).unsqueeze(0).to(ctx.device)


def _width_of(m: nn.Module) -> int:
    return int(m.num_features) if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) else int(m.out_channels)


# ------------------------------------------------------------------------------ masks
def _scale_input(x: torch.Tensor, scale: torch.Tensor, linear: bool) -> torch.Tensor:
    s = scale.to(device=x.device, dtype=x.dtype)
    return x * (s if linear else s.view(1, -1, *([1] * (x.dim() - 2))))


class ChannelMasker:
    """Per-group channel scales multiplied into the consumer's input (GFS's alpha-mask).

    scale = None leaves the group dense; a vector of length D scales channel c by scale[c]
    (GFS: D/|S| on the selected channels, 0 elsewhere).
    """

    def __init__(self, model: nn.Module, groups: Sequence[ChannelGroup]):
        self.modules = dict(model.named_modules())
        self.groups = {g.name: g for g in groups}
        self.scales: dict[str, torch.Tensor | None] = {g.name: None for g in groups}
        self.enabled: dict[str, bool] = {g.name: True for g in groups}
        self._handles = []
        for g in groups:
            self._handles.append(self.modules[g.consumer].register_forward_pre_hook(self._hook(g)))

    def _hook(self, g: ChannelGroup) -> Callable[..., Any]:
        linear = isinstance(self.modules[g.consumer], nn.Linear)

        def pre(_mod: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
            s = self.scales[g.name]
            if s is None or not self.enabled[g.name]:
                return None
            return (_scale_input(args[0], s, linear), *args[1:])

        return pre

    def set(self, name: str, scale: torch.Tensor | None) -> None:
        self.scales[name] = scale

    @contextmanager
    def disabled(self, name: str) -> Iterator[None]:
        self.enabled[name] = False
        try:
            yield
        finally:
            self.enabled[name] = True

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def keep_from_scale(scale: torch.Tensor | None, size: int) -> torch.Tensor:
    """Indices of the channels with a non-zero scale (all channels when scale is None)."""
    if scale is None:
        return torch.arange(size)
    return torch.nonzero(scale != 0).flatten().cpu()


# ----------------------------------------------------------------------------- surgery
def _set_param(mod: nn.Module, name: str, value: torch.Tensor) -> None:
    old = getattr(mod, name)
    setattr(mod, name, nn.Parameter(value.detach().clone().contiguous(), requires_grad=old.requires_grad))


def _slice_out(mod: nn.Module, idx: torch.Tensor) -> None:
    """Keep output channels `idx` of a Linear/Conv2d/BatchNorm/depthwise conv, in place."""
    n = int(idx.numel())
    if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
        if mod.affine:
            _set_param(mod, "weight", mod.weight.data[idx.to(mod.weight.device)])
            _set_param(mod, "bias", mod.bias.data[idx.to(mod.bias.device)])
        if mod.running_mean is not None:
            mod.running_mean = mod.running_mean[idx.to(mod.running_mean.device)].clone()
            mod.running_var = mod.running_var[idx.to(mod.running_var.device)].clone()
        mod.num_features = n
        return
    idx = idx.to(mod.weight.device)
    _set_param(mod, "weight", mod.weight.data[idx])
    if mod.bias is not None:
        _set_param(mod, "bias", mod.bias.data[idx])
    if isinstance(mod, nn.Linear):
        mod.out_features = n
    else:
        mod.out_channels = n
        if _is_depthwise_shape(mod):
            mod.in_channels = n
            mod.groups = n


def _is_depthwise_shape(mod: nn.Conv2d) -> bool:
    return mod.groups > 1 and mod.weight.shape[1] == 1 and mod.groups == mod.in_channels


def _slice_in(mod: nn.Module, idx: torch.Tensor, scale: torch.Tensor | None) -> None:
    """Keep input channels `idx` of a Linear/Conv2d (groups = 1), multiplied by `scale`."""
    idx = idx.to(mod.weight.device)
    w = mod.weight.data[:, idx]
    if scale is not None:
        s = scale.to(device=w.device, dtype=w.dtype)
        w = w * s.view(1, -1, *([1] * (w.dim() - 2)))
    _set_param(mod, "weight", w)
    if isinstance(mod, nn.Linear):
        mod.in_features = int(idx.numel())
    else:
        mod.in_channels = int(idx.numel())


def _submodule(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name)


def shrink(model: nn.Module, groups: Sequence[ChannelGroup], keep: Mapping[str, torch.Tensor],
           scale: Mapping[str, torch.Tensor | None] | None = None, inplace: bool = False) -> nn.Module:
    """A physically smaller model keeping channels keep[g.name] of each group (others untouched).

    scale[g.name] (length D, optional) multiplies the kept channels and is folded into the
    consumer's input weights, so `shrink(model, ..., scale)` computes what the masked model
    computes with a ChannelMasker holding the same scales.
    """
    out = model if inplace else copy.deepcopy(model)
    for g in groups:
        if g.name not in keep:
            continue
        idx = torch.as_tensor(keep[g.name], dtype=torch.long).flatten().sort().values.cpu()
        s = None if scale is None or scale.get(g.name) is None else scale[g.name].detach().cpu()[idx]
        _slice_out(_submodule(out, g.producer), idx)
        for c in g.chain:
            _slice_out(_submodule(out, c), idx)
        _slice_in(_submodule(out, g.consumer), idx, s)
    return out


@torch.no_grad()
def zero_out(model: nn.Module, groups: Sequence[ChannelGroup], keep: Mapping[str, torch.Tensor],
             scale: Mapping[str, torch.Tensor | None] | None = None) -> None:
    """In place and without changing shapes: fold `scale` into the consumer's input columns and
    zero every slice of the removed channels (producer rows and biases, BN affine parameters,
    depthwise filters, consumer columns). The function equals `shrink(...)` on its outputs."""
    for g in groups:
        if g.name not in keep:
            continue
        dead = torch.ones(g.size, dtype=torch.bool)
        dead[torch.as_tensor(keep[g.name], dtype=torch.long).cpu()] = False
        cons = _submodule(model, g.consumer)
        s = None if scale is None else scale.get(g.name)
        col = torch.ones(g.size) if s is None else s.detach().cpu().clone()
        col[dead] = 0.0
        cons.weight.mul_(col.to(cons.weight).view(1, -1, *([1] * (cons.weight.dim() - 2))))
        for p, dim in group_members(model, g):
            idx = [slice(None)] * p.dim()
            idx[dim] = dead.to(p.device)
            p[tuple(idx)] = 0.0


def group_members(model: nn.Module, g: ChannelGroup) -> list[tuple[nn.Parameter, int]]:
    """Every parameter slice indexed by the group's channel: (parameter, channel dim)."""
    out: list[tuple[nn.Parameter, int]] = []
    for name in (g.producer, *g.chain):
        mod = _submodule(model, name)
        for pname in ("weight", "bias"):
            p = getattr(mod, pname, None)
            if isinstance(p, nn.Parameter):
                out.append((p, 0))
    return out


@torch.no_grad()
def alive_channels(model: nn.Module, g: ChannelGroup) -> torch.Tensor:
    """Boolean (D,): channels with a non-zero entry in some member slice (others are exactly 0
    at the consumer's input)."""
    alive = torch.zeros(g.size, dtype=torch.bool)
    for p, _dim in group_members(model, g):
        alive |= p.detach().reshape(g.size, -1).ne(0).any(dim=1).cpu()
    return alive


def alive_indices(model: nn.Module, g: ChannelGroup) -> torch.Tensor:
    """Indices of the alive channels; channel 0 when none is (a layer keeps one, exactly zero)."""
    idx = torch.nonzero(alive_channels(model, g)).flatten()
    return idx if idx.numel() > 0 else torch.zeros(1, dtype=torch.long)


def channel_mask(layout: ParamLayout, groups: Sequence[ChannelGroup], keep: Mapping[str, torch.Tensor],
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """Flat mask over `layout` (dense shapes) that is False on the removed channels' producer rows,
    depthwise filters and consumer columns."""
    parts = [torch.ones(s, dtype=torch.bool) for s in layout.shapes]
    where = {n: i for i, n in enumerate(layout.names)}
    for g in groups:
        if g.name not in keep:
            continue
        dead = torch.ones(g.size, dtype=torch.bool)
        dead[torch.as_tensor(keep[g.name], dtype=torch.long).cpu()] = False
        for mod in (g.producer, *g.chain):
            i = where.get(f"{mod}.weight")
            if i is not None:
                parts[i][dead] = False
        i = where.get(f"{g.consumer}.weight")
        if i is not None:
            parts[i][:, dead] = False
    return torch.cat([p.reshape(-1) for p in parts]).to(device)


def relayout(model: nn.Module, layout: ParamLayout) -> ParamLayout:
    """The same prunable tensor names on a (smaller) model."""
    return make_layout(model, list(layout.names))


def effective_counts(model: nn.Module, example: torch.Tensor) -> tuple[int, int]:
    """(MACs, parameters) per example that remain when structurally zero kernel slices are skipped
    (`flops.count(structured=True)`); parameters outside Linear/Conv2d (BN, ...) count in full."""
    rep = flops.count(model, example, structured=True)
    in_layers = sum(p.numel() for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))
                    for p in m.parameters(recurse=False))
    return rep.macs, rep.params + rep.total_params - in_layers


def structured_report(dense: nn.Module, pruned: nn.Module, example: torch.Tensor, groups: Sequence[ChannelGroup],
                      kept: Mapping[str, int], dense_layout: ParamLayout | None = None,
                      pruned_layout: ParamLayout | None = None) -> dict[str, float | int]:
    """`structured/...` metrics of `pruned` (physically smaller, possibly with zeros left) against
    the dense model: MACs and parameters kept (zero kernel slices skipped), their ratios, and the
    channels kept per group."""
    fd = flops.count(dense, example)
    macs, params = effective_counts(pruned, example)
    total = sum(g.size for g in groups)
    n_kept = sum(int(kept.get(g.name, g.size)) for g in groups)
    out: dict[str, float | int] = {
        "structured/flops_dense": fd.macs,
        "structured/flops_kept": macs,
        "structured/flops_ratio": macs / max(fd.macs, 1),
        "structured/params_dense": fd.total_params,
        "structured/params_kept": params,
        "structured/params_ratio": params / max(fd.total_params, 1),
        "structured/channels_total": total,
        "structured/channels_kept": n_kept,
        "structured/channel_sparsity": 1.0 - n_kept / max(total, 1),
    }
    if dense_layout is not None and pruned_layout is not None:
        out["structured/prunable_params_dense"] = dense_layout.numel
        out["structured/prunable_params_kept"] = pruned_layout.numel
        out["structured/prunable_params_ratio"] = pruned_layout.numel / max(dense_layout.numel, 1)
    for g in groups:
        out[f"structured/channels/{g.name}"] = int(kept.get(g.name, g.size))
        out[f"structured/channels_dense/{g.name}"] = g.size
    return out


def zeros_report(model: nn.Module, example: torch.Tensor, groups: Sequence[ChannelGroup]) -> tuple[
        dict[str, float | int], dict[str, torch.Tensor]]:
    """Structured metrics of a same-shape model whose removed channels are zero groups (sdprun,
    grda): the channels alive in each group, and the report of the model without the dead ones.
    Returns (report, keep)."""
    keep = {g.name: alive_indices(model, g) for g in groups}
    small = shrink(model, groups, keep)
    kept = {k: int(v.numel()) for k, v in keep.items()}
    return structured_report(model, small, example, groups, kept), keep


# -------------------------------------------------------------------------- suffix runs
def _expand(v: Any, k: int, batch: int) -> Any:
    if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == batch:
        return v.unsqueeze(0).expand(k, *v.shape).reshape(k * batch, *v.shape[1:])
    if isinstance(v, (tuple, list)):
        return type(v)(_expand(x, k, batch) for x in v)
    return v


class SuffixRunner(fx.Interpreter):
    """Run a model once on a batch, keep only what the part of the graph downstream of the
    group's masked activation needs, then evaluate that downstream part for K channel scalings
    at once (the K copies stacked along the batch axis). The prefix is never re-run per scaling.
    """

    def __init__(self, gm: fx.GraphModule, group: ChannelGroup, linear_consumer: bool):
        super().__init__(gm, garbage_collect_values=False)
        self.group = group
        self.linear = linear_consumer
        nodes = list(gm.graph.nodes)
        by_name = {n.name: n for n in nodes}
        self.input_node = by_name[group.input_node]
        consumer = by_name[group.consumer_node]
        dirty: set[fx.Node] = {consumer}
        for n in nodes:
            if n is not consumer and any(a in dirty for a in n.all_input_nodes):
                dirty.add(n)
        self.dirty = [n for n in nodes if n in dirty]
        self.boundary = {a for n in self.dirty for a in n.all_input_nodes if a not in dirty}
        self.boundary.add(self.input_node)
        # execution of the capture pass stops once every boundary value exists; values no longer
        # needed are freed as soon as their last user has run
        order = {n: i for i, n in enumerate(nodes)}
        self.last = max(order[b] for b in self.boundary)
        self.prefix = nodes[: self.last + 1]
        self.last_use: dict[fx.Node, int] = {}
        for i, n in enumerate(self.prefix):
            for a in n.all_input_nodes:
                self.last_use[a] = i

    @torch.no_grad()
    def capture(self, x: torch.Tensor) -> dict[fx.Node, Any]:
        """Values of the boundary nodes for input batch x."""
        self.env = {}
        args_iter = iter([x])
        self.args_iter = args_iter
        for i, n in enumerate(self.prefix):
            self.env[n] = self.run_node(n)
            for a in n.all_input_nodes:
                if self.last_use.get(a) == i and a not in self.boundary:
                    del self.env[a]
        out = {b: self.env[b] for b in self.boundary}
        self.env = {}
        return out

    @torch.no_grad()
    def run_suffix(self, values: Mapping[fx.Node, Any], scales: torch.Tensor) -> torch.Tensor:
        """Model outputs (K * B, ...) with the masked activation scaled per channel by each row
        of `scales` (K, D); row k occupies rows [k B, (k + 1) B) of the output."""
        h = values[self.input_node]
        batch, k = int(h.shape[0]), int(scales.shape[0])
        self.env = {b: _expand(v, k, batch) for b, v in values.items() if b is not self.input_node}
        s = scales.to(device=h.device, dtype=h.dtype)
        if self.linear:
            hk = h.unsqueeze(0) * s.view(k, *([1] * (h.dim() - 1)), -1)
        else:
            hk = h.unsqueeze(0) * s.view(k, 1, -1, *([1] * (h.dim() - 2)))
        self.env[self.input_node] = hk.reshape(k * batch, *h.shape[1:])
        out = None
        for n in self.dirty:
            if n.op == "output":
                out = self.fetch_args_kwargs_from_env(n)[0][0]
                break
            self.env[n] = self.run_node(n)
        self.env = {}
        if out is None:
            raise RuntimeError(f"the output does not depend on group {self.group.name}")
        return out


def disable_inplace(model: nn.Module) -> list[nn.Module]:
    """Turn off `inplace` on activation modules (a cached value must not change under us);
    returns the modules changed, for `restore_inplace`."""
    changed = []
    for m in model.modules():
        if getattr(m, "inplace", False) is True:
            m.inplace = False
            changed.append(m)
    return changed


def restore_inplace(mods: Sequence[nn.Module]) -> None:
    for m in mods:
        m.inplace = True


__all__ = [
    "ChannelGroup", "ChannelMasker", "SuffixRunner", "alive_channels", "alive_indices", "channel_mask", "disable_inplace",
    "find_channel_groups", "group_members", "keep_from_scale", "relayout", "restore_inplace", "shrink",
    "effective_counts", "structured_report", "trace", "zero_out", "zeros_report",
]

"""Reading published checkpoints safely, and mapping their key layouts onto this project's models.

Published pruning checkpoints are whole training states pickled with `torch.save`: besides the
weights they hold optimizer and scheduler objects, config objects of the authors' code bases
(e.g. WoodFisher, Singh & Alistarh, NeurIPS 2020: `mnist_25_epoch_93.97.ckpt` stores a
`torch.optim.SGD` class and an `ExponentialLR` object), which `torch.load(weights_only=True)`
refuses and which plain `pickle` would import and run.

`safe_torch_load` first tries `torch.load(weights_only=True)`. Only when that refuses a class
(or a pickle opcode it does not implement) does it read the file again through torch's own loader
with a restricted unpickler: tensors are rebuilt by torch's rebuild functions and storages,
containers and plain values as usual, and every other global (class or function) becomes an inert
`Placeholder` subclass. No module is imported and no callable outside `_ALLOWED` is ever called,
so nothing in a file executes (a `__reduce__` naming `os.system` yields a placeholder holding its
arguments).

`network_state` maps a file's state dict onto a model's keys: DataParallel's `module.` prefix,
WoodFisher's masked wrappers (`fc1._layer.weight` and `fc1._weight_mask`: the weight is
`_layer.weight * _weight_mask`), and the usual aliases (`fc` / `linear` classifier, `downsample` /
`shortcut` option-B blocks), renaming a key only when the model has the alias and not the key.
"""

from __future__ import annotations

import _compat_pickle
import collections
import io
import pickle
import re
import types
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from pruning.errors import ConfigError

CHECKPOINT_KEY = "model.checkpoint"
ALLOWED_FILE = "a PyTorch checkpoint (torch.save) holding a state dict"
_STATE_KEYS = ("state_dict", "model_state_dict", "model", "net")  # where training states keep the weights
_ALIASES = (("fc", "linear"), ("linear", "fc"), ("downsample", "shortcut"), ("shortcut", "downsample"))


class Placeholder:
    """Stands for an object of a class the restricted unpickler would not load: inert, it only keeps
    what the pickle gave it (constructor arguments and state) for inspection."""

    origin = "?"  # "module.qualname" named in the file
    dump_patches = False  # read by torch's legacy loader for pickled nn.Module containers

    def __new__(cls, *args: Any, **kwargs: Any) -> Placeholder:
        obj = object.__new__(cls)
        obj.__dict__.update(args=args, kwargs=kwargs, state=None)
        return obj

    def __init__(self, *args: Any, **kwargs: Any):
        pass  # __new__ kept the arguments; nothing else may run

    def __setstate__(self, state: Any) -> None:
        self.__dict__["state"] = state

    # containers pickled as subclasses of dict or list (e.g. attribute-dict configs) fill themselves
    # through these: keep the items
    def __setitem__(self, key: Any, value: Any) -> None:
        self.__dict__.setdefault("items", {})[key] = value

    def append(self, value: Any) -> None:
        self.__dict__.setdefault("values", []).append(value)

    def extend(self, values: Any) -> None:
        self.__dict__.setdefault("values", []).extend(values)

    def __call__(self, *args: Any, **kwargs: Any) -> Placeholder:
        # e.g. `getattr(Path, "touch")` became a placeholder, and the file then calls it
        return type(self)(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<placeholder for {self.origin}>"


def _placeholder(module: str, name: str) -> type[Placeholder]:
    # __module__ stays ours: torch's legacy loader may look up the source of a container class
    return type(name, (Placeholder,), {"origin": f"{module}.{name}", "__module__": __name__})


def _latin1_bytes(text: str, encoding: str = "latin1") -> bytes:
    """`_codecs.encode` as protocol-2 pickles use it for bytes; no other codec (a codec lookup by
    name would import modules)."""
    if not isinstance(text, str) or str(encoding).lower().replace("-", "").replace("_", "") not in _LATIN1:
        raise pickle.UnpicklingError(f"_codecs.encode with {encoding!r} is not allowed")
    return text.encode("latin1")


def _reconstructor(cls: Any, base: Any, state: Any) -> Placeholder:
    """`copyreg._reconstructor` (protocol 0/1 objects) for placeholder classes only."""
    if not (isinstance(cls, type) and issubclass(cls, Placeholder)):
        raise pickle.UnpicklingError(f"copyreg._reconstructor of {cls!r} is not allowed")
    return cls(state)


def _rebuild_tensor_v2(storage: Any, offset: int, size: Any, stride: Any, requires_grad: bool,
                       backward_hooks: Any, metadata: Any = None) -> torch.Tensor:
    """torch's `_rebuild_tensor_v2` without the file's backward hooks (callables: placeholders here)."""
    return torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad,
                                           collections.OrderedDict(), metadata)


def _rebuild_parameter(data: torch.Tensor, requires_grad: bool, backward_hooks: Any) -> torch.nn.Parameter:
    """torch's `_rebuild_parameter` without the file's backward hooks."""
    return torch.nn.Parameter(data, requires_grad)


_LATIN1 = ("latin1", "iso88591", "l1")
# torch's dtypes by name, read without getattr(torch, ...): torch's module __getattr__ imports submodules
_DTYPES = {name: v for name, v in vars(torch).items() if isinstance(v, torch.dtype)}

# The only globals a file may name and get as themselves: tensor and container rebuilding.
# Storage classes never reach find_class (torch's loader maps them to dtypes itself).
_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): torch._utils._rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch", "Size"): torch.Size,
    ("torch", "device"): torch.device,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "complex"): complex,
    ("builtins", "slice"): slice,
    ("_codecs", "encode"): _latin1_bytes,
    ("copyreg", "_reconstructor"): _reconstructor,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler whose `find_class` returns allow-listed objects, torch dtypes, or placeholders.

    Every other opcode that could run code (REDUCE, NEWOBJ, INST, OBJ, BUILD, EXT) acts only on what
    `find_class` returned, so code in a file can only reach `_ALLOWED` and `Placeholder` methods.
    """

    def find_class(self, module: str, name: str) -> Any:
        # Python 2 names, as protocol-2 pickles write them (what pickle's own find_class maps)
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        allowed = _ALLOWED.get((module, name))
        if allowed is not None:
            return allowed
        if module == "torch" and name in _DTYPES:
            return _DTYPES[name]
        return _placeholder(module, name)


def _restricted_load(file: Any, **kwargs: Any) -> Any:
    return RestrictedUnpickler(file, **kwargs).load()


# What torch.load needs of a `pickle_module`: an Unpickler class (subclassed for storages) and load().
_RESTRICTED_PICKLE = types.SimpleNamespace(Unpickler=RestrictedUnpickler, load=_restricted_load,
                                           __name__="pruning.models.checkpoints.restricted_pickle")


def _refused_class(exc: BaseException) -> bool:
    """True when weights_only loading failed because the file names a class it does not allow (or
    uses a pickle opcode it lacks, e.g. FRAME of `torch.save(..., pickle_protocol=4)`), not because
    the file is damaged."""
    msg = str(exc)
    return isinstance(exc, pickle.UnpicklingError) and any(
        s in msg for s in ("Unsupported global", "unsupported GLOBAL", "Can only create new object",
                           "call reduce for unrecognized function", "Can only build", "Unsupported operand"))


# torch.save writes a zip archive; before torch 1.6 a pickle stream opened by this magic number
# (a pickled int, 10 bytes little-endian); before 0.4 a tar archive.
_ZIP_MAGIC = b"PK\x03\x04"
_LEGACY_MAGIC = (0x1950A86A20F9469CFC6C).to_bytes(10, "little")


def _torch_format(data: bytes) -> bool:
    return data.startswith(_ZIP_MAGIC) or _LEGACY_MAGIC in data[:32] or data[257:262] == b"ustar"


def _unreadable(path: Path, exc: BaseException) -> ConfigError:
    text = str(exc).strip()
    if "WeightsUnpickler error:" in text:  # skip torch's advice to use weights_only=False
        text = text.split("WeightsUnpickler error:", 1)[1].strip()
    detail = (text.splitlines() or [""])[0]
    detail = detail[:120] + ("..." if len(detail) > 120 else "")
    why = f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
    if isinstance(exc, EOFError) or any(w in text.lower() for w in ("truncated", "unexpected eof")):  # cut short
        return ConfigError(CHECKPOINT_KEY, str(path), ALLOWED_FILE, f"is truncated ({why}): an incomplete copy?")
    return ConfigError(CHECKPOINT_KEY, str(path), ALLOWED_FILE, f"cannot be read as a checkpoint ({why})")


def safe_torch_load(path: str | Path) -> Any:
    """The object stored in `path` (tensors on the CPU) without running anything from the file.

    ConfigError (one line naming the file) when it is missing, a directory, empty, truncated or not
    a torch/pickle file.
    """
    path = Path(path)
    if path.is_dir():
        raise ConfigError(CHECKPOINT_KEY, str(path), ALLOWED_FILE, "is a directory")
    if not path.is_file():
        raise ConfigError(CHECKPOINT_KEY, str(path), "a path to an existing state-dict file, or null "
                          "to train the dense model and cache it", "does not exist")
    if path.stat().st_size == 0:
        raise ConfigError(CHECKPOINT_KEY, str(path), ALLOWED_FILE, "is empty")
    data = path.read_bytes()
    if not _torch_format(data):
        raise ConfigError(CHECKPOINT_KEY, str(path), ALLOWED_FILE,
                          f"is not a PyTorch checkpoint (starts with {data[:12]!r})")
    # a zip archive ends with its end-of-central-directory record (22 bytes + a comment of < 64 KiB);
    # without it the file was cut short, and torch's reader fails with an unhelpful IndexError
    if data.startswith(_ZIP_MAGIC) and b"PK\x05\x06" not in data[-(22 + 65535):]:
        raise ConfigError(CHECKPOINT_KEY, str(path), ALLOWED_FILE,
                          f"is truncated ({len(data)} bytes of a zip archive without its end record: "
                          f"an incomplete copy or download?)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols: keep the error one line
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # any failure means "not a readable checkpoint": report it as one line
        if not _refused_class(exc):
            raise _unreadable(path, exc) from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. SourceChangeWarning for pickled module classes
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False,
                              pickle_module=_RESTRICTED_PICKLE)
    except Exception as exc:
        raise _unreadable(path, exc) from None


def find_state(blob: Any) -> tuple[Mapping[str, Any] | None, dict[str, Any]]:
    """The state dict inside a loaded file and the file's other entries (e.g. `best_prec1`).

    A bare state dict, or a training state with it under one of `_STATE_KEYS`
    (`state_dict`: akamaster/Distiller, `model_state_dict`: WoodFisher). None when there is none.
    """
    if not isinstance(blob, Mapping):
        return None, {}
    for key in _STATE_KEYS:
        if isinstance(blob.get(key), Mapping):
            return blob[key], {k: v for k, v in blob.items() if k != key}
    return blob, {}


def network_state(state: Mapping[str, Any], expected: Mapping[str, Any]) -> dict[str, Any]:
    """`state` in the key layout of `expected` (a model's state dict), masks applied.

    Strips `module.` prefixes; turns `<m>._layer.<p>` with `<m>._<p>_mask` into `<m>.<p> * mask`;
    renames a dotted component by `_ALIASES` only when that makes an unknown key known. Keys that
    still do not fit are kept as they are, for the caller's strict check to report.
    """
    stripped: dict[str, Any] = {}
    for key, value in state.items():
        while key.startswith("module."):
            key = key[len("module."):]
        stripped[key] = value
    out: dict[str, Any] = {}
    for key, value in stripped.items():
        m = re.fullmatch(r"(.*?)\._(\w+)_mask", key)
        if m and f"{m[1]}._layer.{m[2]}" in stripped:
            continue  # applied to its weight below
        m = re.fullmatch(r"(.*?)\._layer\.(\w+)", key)
        if m:
            key = f"{m[1]}.{m[2]}"
            mask = stripped.get(f"{m[1]}._{m[2]}_mask")
            if isinstance(mask, torch.Tensor) and isinstance(value, torch.Tensor):
                value = value * mask.to(value.dtype)
        out[_alias(key, expected)] = value
    return out


def _alias(key: str, expected: Mapping[str, Any]) -> str:
    if key in expected:
        return key
    parts = key.split(".")
    for i, part in enumerate(parts):
        for src, dst in _ALIASES:
            if part == src:
                candidate = ".".join([*parts[:i], dst, *parts[i + 1:]])
                if candidate in expected:
                    return candidate
    return key


__all__ = ["Placeholder", "RestrictedUnpickler", "find_state", "network_state", "safe_torch_load"]

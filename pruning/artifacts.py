"""The pruned model a run leaves behind: `<run_dir>/model.pt`, and `load_pruned` to get it back.

File format (version 1), written with `torch.save` and readable with `torch.load(weights_only=True)`
(tensors, strings, numbers, lists and dicts only; nothing is unpickled as code):

  format       "pruning-noise/model"
  version      1
  state_dict   the Classifier's state dict (normalisation buffers + network), on CPU
  mask         the flat boolean mask over the prunable tensors (layout order), or None (task=train)
  prunable     the prunable tensor names, in layout order (how the mask maps onto the state dict)
  meta         plain metadata: run_id, index keys, task, final metrics

The run record holds the file's path (relative to the run directory, so sweeps can be moved) and
its sha256 under `model_file`; `load_pruned` rebuilds the model from `config.resolved.json`,
checks the digest and loads the weights. Because the weights sit under `state_dict`,
`model.checkpoint=<run_dir>/model.pt` also starts a new run from a saved model (`models.load_weights`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from pruning.checkpoint import atomic_torch_save
from pruning.errors import ConfigError
from pruning.record import sha256_file

MODEL_FILE = "model.pt"
FORMAT = "pruning-noise/model"
VERSION = 1


def _plain(obj: Any) -> Any:
    """Only what `torch.load(weights_only=True)` accepts: dicts, lists, str, int, float, bool, None."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if isinstance(obj, torch.Tensor) and obj.ndim == 0:
        return obj.item()
    return str(obj)


def save_pruned(run_dir: str | os.PathLike, model: torch.nn.Module, mask: torch.Tensor | None,
                prunable: list[str], meta: Mapping[str, Any]) -> dict[str, Any]:
    """Write `<run_dir>/model.pt` atomically; returns the record entry {path, sha256, bytes}."""
    path = Path(run_dir) / MODEL_FILE
    blob = {
        "format": FORMAT,
        "version": VERSION,
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "mask": mask.detach().cpu().clone() if mask is not None else None,
        "prunable": list(prunable),
        "meta": _plain(meta),
    }
    atomic_torch_save(blob, path)
    return {"path": MODEL_FILE, "sha256": sha256_file(path), "bytes": path.stat().st_size}


@dataclass
class PrunedModel:
    """A run's saved model, ready to evaluate: `model` (eval mode, on `device`), its `mask`, the
    run's `data` (test split included), the resolved `config` and the run `record`."""

    model: torch.nn.Module
    mask: torch.Tensor | None
    data: Any
    config: dict[str, Any]
    record: dict[str, Any]
    path: Path


def _fail(path: Path, problem: str, allowed: str) -> ConfigError:
    return ConfigError("run_dir", str(path), allowed, problem)


def model_path(run_dir: str | os.PathLike, record: Mapping[str, Any] | None = None) -> Path:
    """Where the run's model file is (the record's `model_file.path`, relative to the run directory)."""
    entry = (record or {}).get("model_file") or {}
    rel = entry.get("path") or MODEL_FILE
    return Path(run_dir) / rel


def load_pruned(run_dir: str | os.PathLike, device: str | torch.device = "cpu",
                data_dir: str | os.PathLike | None = None, verify: bool = True) -> PrunedModel:
    """The pruned (and fine-tuned) model a run saved, rebuilt from its `config.resolved.json`.

    Checks the file's sha256 against `result.json` (`verify=False` skips it); `data_dir` overrides
    the run's `paths.data_dir` (e.g. the data moved). Errors name the file and what is wrong.
    """
    from pruning.data import build_dataset
    from pruning.models import build_model
    from pruning.record import read_json

    run_dir = Path(run_dir)
    record = read_json(run_dir / "result.json")
    if record is None:
        raise _fail(run_dir / "result.json", "is missing or unreadable", "a run directory with result.json")
    config = read_json(run_dir / "config.resolved.json")
    if config is None:
        raise _fail(run_dir / "config.resolved.json", "is missing or unreadable",
                    "a run directory with config.resolved.json")
    path = model_path(run_dir, record)
    if not path.is_file():
        raise _fail(path, "does not exist", "a run that saved its model (save_model: true, status completed)")
    expected = (record.get("model_file") or {}).get("sha256")
    if verify and expected:
        actual = sha256_file(path)
        if actual != expected:
            raise _fail(path, f"has sha256 {actual[:12]}..., result.json records {expected[:12]}...",
                        "the file the run wrote (re-run the cell, or verify=False to load it anyway)")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(blob, Mapping) or blob.get("format") != FORMAT:
        raise _fail(path, "is not a pruned-model file", f"a file written by pruning.artifacts ({FORMAT})")
    cfg = OmegaConf.create(config)
    data = build_dataset(cfg.dataset, data_dir if data_dir is not None else cfg.paths.data_dir)
    model = build_model(cfg.model, data)
    state = blob["state_dict"]
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if {k: tuple(v.shape) for k, v in state.items()} != shapes:
        raise _fail(path, "holds tensors of other shapes than the configured model (a structured method "
                    "shrank it)", "a run whose method keeps the architecture (unstructured masks)")
    model.load_state_dict(state)
    model.to(device).eval()
    mask = blob.get("mask")
    return PrunedModel(model=model, mask=mask.to(device) if mask is not None else None, data=data,
                       config=config, record=record, path=path)

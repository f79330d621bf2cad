"""The run's device, and never a silent CPU fallback.

`device=auto` resolves to CPU when torch sees no usable CUDA device. That is right on a laptop,
and wrong when the job asked for GPUs (`resources.gpus > 0`) or the machine has one that this
torch cannot use (GPUs listed in CUDA_VISIBLE_DEVICES, /dev/nvidia* device files, a CPU-only torch
build, or the warning torch emits when the driver is too old): a GPU-sized study would run for
days on CPU. `pick_device` returns the device plus a one-line `fallback` reason for those cases;
the task logs it as a warning and stores it in the run record (`env.device_fallback`).
`device=cuda` without a usable GPU stays an error (`pruning.config.resolve_device`).
"""

from __future__ import annotations

import glob
import os
import warnings

import torch

from pruning.config import resolve_device


def describe(device: torch.device) -> str:
    """`cpu (2 threads)` or `cuda:0 NVIDIA H200`."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} {torch.cuda.get_device_name(index)}"
    return f"{device.type} ({torch.get_num_threads()} threads)"


def _gpu_hints(gpus_requested: int) -> list[str]:
    """Signs that a GPU was meant to be used here."""
    hints = []
    if gpus_requested > 0:
        hints.append(f"the job asked for resources.gpus={gpus_requested}")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible not in (None, "", "-1", "none", "NoDevFiles"):
        hints.append(f"CUDA_VISIBLE_DEVICES={visible}")
    nodes = sorted(glob.glob("/dev/nvidia[0-9]*"))
    if nodes:
        hints.append(f"{len(nodes)} NVIDIA device file(s) in /dev")
    return hints


def pick_device(spec: str, gpus_requested: int = 0) -> tuple[torch.device, str | None]:
    """(device, fallback): `fallback` says why CPU is suspicious when `auto` resolved to CPU while
    a GPU was requested or appears present; None otherwise."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        available = torch.cuda.is_available()  # torch warns here when the driver is too old
        device = resolve_device(spec)
    if str(spec) != "auto" or device.type != "cpu" or available:
        return device, None
    hints = _gpu_hints(int(gpus_requested or 0))
    if not hints:
        return device, None
    why = [" ".join(str(w.message).split())[:300] for w in caught
           if "cuda" in str(w.message).lower() or "driver" in str(w.message).lower()]
    if torch.version.cuda is None:
        why.append(f"this torch build ({torch.__version__}) has no CUDA support")
    if not why:
        why.append("torch.cuda.is_available() is False")
    return device, f"device=auto fell back to CPU although {', '.join(hints)}: {'; '.join(why)}"

"""Errors a user can act on: each names the config key, the bad value and what is allowed.

The one set of checks every config uses (one line each, `key=value problem; allowed: ...`):
choice, number, integer, numbers, flag, megabytes, require, and unknown_key for a key that does
not exist (naming the closest one)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any


class ConfigError(ValueError):
    """A configuration mistake; reported as one line, never as a traceback."""

    def __init__(self, key: str, value: Any, allowed: str, problem: str | None = None):
        self.key, self.value, self.allowed, self.problem = key, value, allowed, problem
        what = problem or "is not allowed"
        super().__init__(f"{key}={value!r} {what}; allowed: {allowed}")


def choice(value: Any, key: str, allowed: Iterable[str]) -> str:
    """`value` if it is one of `allowed`, else a ConfigError naming `key` and the choices."""
    allowed = tuple(allowed)
    if value not in allowed:
        raise ConfigError(key, value, ", ".join(allowed))
    return str(value)


def closest(key: str, candidates: Iterable[str]) -> str | None:
    """The candidate nearest to a mistyped `key` (difflib ratio >= 0.6), or None."""
    import difflib

    cands = list(candidates)
    match = difflib.get_close_matches(key, cands, n=1, cutoff=0.6)
    if not match:  # `spars` vs `sparsity`: compare the last dotted part too
        tail = key.rsplit(".", 1)[-1]
        by_tail = {c.rsplit(".", 1)[-1]: c for c in cands}
        match = [by_tail[m] for m in difflib.get_close_matches(tail, list(by_tail), n=1, cutoff=0.6)]
    return match[0] if match else None


def unknown_key(key: str, value: Any, candidates: Iterable[str], where: str = "a config key") -> ConfigError:
    """ConfigError for a key that does not exist, naming the closest valid key."""
    cands = sorted(set(candidates))
    near = closest(key, cands)
    allowed = f"did you mean {near}?" if near else "one of " + ", ".join(cands[:12]) + (" ..." if len(cands) > 12 else "")
    return ConfigError(key, value, allowed, f"is not {where}")


class RunCheckError(RuntimeError):
    """A run that finished its computation but failed a check (e.g. its achieved sparsity misses
    the target): recorded as failed and reported as one line, never as a traceback."""


def number(value: Any, key: str, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
           hi_open: bool = False, allowed: str | None = None, fractions: bool = True) -> float:
    """A finite float in [lo, hi] (an open end with `lo_open` / `hi_open`). `fractions`: a string such as "8/255"
    or "0.5" is read as a number too (handy on the command line; a method's frozen config keeps what
    it was given, so methods pass False). `allowed` replaces the generated description of the range
    in the message (the problem is then not named, as in ConfigError's default)."""
    out: float | None = None
    if isinstance(value, bool):
        out = None
    elif isinstance(value, (int, float)):
        out = float(value)
    elif isinstance(value, str) and fractions:
        try:
            if "/" in value:
                num, den = value.split("/", 1)
                out = float(num) / float(den)
            else:
                out = float(value)
        except (ValueError, ZeroDivisionError):
            out = None
    bounds = (f"{'(' if lo_open else '['}{lo if lo is not None else '-inf'}, "
              f"{hi if hi is not None else 'inf'}{')' if hi_open else ']'}")
    if out is None or not math.isfinite(out):
        if allowed is not None:
            raise ConfigError(key, value, allowed)
        raise ConfigError(key, value, f"a number in {bounds}" + (" (or a fraction such as 8/255)" if fractions else ""),
                          "is not a number")
    if (lo is not None and (out < lo or (lo_open and out == lo))) or (hi is not None and (out > hi or (hi_open and out == hi))):
        if allowed is not None:
            raise ConfigError(key, value, allowed)
        raise ConfigError(key, value, f"a number in {bounds}", "is out of range")
    return out


def integer(value: Any, key: str, lo: int = 0, allowed: str | None = None) -> int:
    """An int >= lo (a bool is not an integer); `allowed` replaces "an integer >= lo" in the message."""
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ConfigError(key, value, allowed or f"an integer >= {lo}")
    return int(value)


def numbers(value: Any, key: str, lo: float | None = None, hi: float | None = None) -> tuple[float, ...]:
    """A non-empty list of numbers (a single number is a list of one)."""
    items = list(value) if isinstance(value, (list, tuple)) or _is_list_config(value) else [value]
    if not items:
        raise ConfigError(key, value, "a non-empty list of numbers", "is empty")
    return tuple(number(v, f"{key}[{i}]", lo, hi) for i, v in enumerate(items))


def _is_list_config(value: Any) -> bool:
    return type(value).__name__ == "ListConfig"  # omegaconf's list, without importing it in the core


def flag(value: Any, key: str, default: bool | None = None) -> bool:
    """A boolean (`None` takes `default` when one is given)."""
    if value is None and default is not None:
        return default
    if not isinstance(value, bool):
        raise ConfigError(key, value, "true, false")
    return value


def megabytes(value: Any, key: str, allow_none: bool = False) -> float | None:
    """A positive number of MiB (or null when `allow_none`)."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(key, value, "a positive number of MiB" + (" or null" if allow_none else ""))
    return float(value)


def require(cond: bool, key: str, value: Any, allowed: str, problem: str | None = None) -> None:
    """Raise ConfigError(key, value, allowed, problem) unless `cond`."""
    if not cond:
        raise ConfigError(key, value, allowed, problem)


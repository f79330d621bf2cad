"""Errors a user can act on: each names the config key, the bad value and what is allowed."""

from __future__ import annotations

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

"""Errors a user can act on: each names the config key, the bad value and what is allowed."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


class ConfigError(ValueError):
    """A configuration mistake; reported as one line, never as a traceback."""

    def __init__(self, key: str, value: Any, allowed: str, problem: str | None = None):
        self.key, self.value, self.allowed = key, value, allowed
        what = problem or "is not allowed"
        super().__init__(f"{key}={value!r} {what}; allowed: {allowed}")


def choice(value: Any, key: str, allowed: Iterable[str]) -> str:
    """`value` if it is one of `allowed`, else a ConfigError naming `key` and the choices."""
    allowed = tuple(allowed)
    if value not in allowed:
        raise ConfigError(key, value, ", ".join(allowed))
    return str(value)

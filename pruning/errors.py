"""Errors a user can act on: each names the config key, the bad value and what is allowed."""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A configuration mistake; reported as one line, never as a traceback."""

    def __init__(self, key: str, value: Any, allowed: str, problem: str | None = None):
        self.key, self.value, self.allowed = key, value, allowed
        what = problem or "is not allowed"
        super().__init__(f"{key}={value!r} {what}; allowed: {allowed}")

"""Trackers mirror the run record to a dashboard. The local record is the source of truth, so a
tracker never fails a run: `logger=local` is the no-op tracker below."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class Tracker:
    """No-op tracker (`logger=local`): result.json and metrics.jsonl are all there is."""

    def start(self, record: Any, config: Mapping[str, Any]) -> None:
        pass

    def log(self, row: Mapping[str, Any], step: int) -> None:
        pass

    def finish(self, record: Any) -> None:
        pass


def build_tracker(cfg: Mapping[str, Any]) -> Tracker:
    name = cfg.get("name", "local")
    if name == "local":
        return Tracker()
    from pruning.errors import ConfigError

    raise ConfigError("logger", name, "local")

"""Console and log-file output of a run, through Python `logging` (one logger per module).

Under Hydra, `hydra.job_logging` in conf/config.yaml sends every record to two handlers: the
console (`ConsoleHandler`: what the task always printed, plain lines on stdout, `warning: ...` and
`error: ...` on stderr) and `<run_dir>/<job_name>.log` (e.g. `launch.log`, with time, logger and
level). Without Hydra (`pruning.task.run` from Python, tests) `ensure_console` attaches the same
console handler to the `pruning` logger, so the console output is the same either way.

Progress bars: `show_progress` is the one switch every tqdm bar follows (through `Job.progress`):
bars only on a terminal; in a Slurm log each `\r` update would be a line, and the task logs one
plain line per epoch instead.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

PACKAGE = "pruning"


class ConsoleHandler(logging.Handler):
    """Info on stdout as plain lines; warnings and errors on stderr as `warning: ...`/`error: ...`.

    The streams are looked up at each record (not bound at construction), so redirections made
    after logging is configured (pytest's capture, submitit's log files) are followed."""

    def __init__(self, stream: Any = None, level: int = logging.NOTSET):  # `stream`: Hydra's default key
        super().__init__(level)

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.exc_info:
            msg = f"{msg}\n{logging.Formatter().formatException(record.exc_info)}"
        if record.levelno >= logging.ERROR:
            return f"error: {msg}"
        if record.levelno >= logging.WARNING:
            return f"warning: {msg}"
        return msg

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:
            self.handleError(record)


class _FallbackConsole(ConsoleHandler):
    """The console when logging was not configured with a `ConsoleHandler` (no Hydra)."""

    def emit(self, record: logging.LogRecord) -> None:
        if any(isinstance(h, ConsoleHandler) for h in logging.getLogger().handlers):
            return  # Hydra's job logging prints it already
        super().emit(record)


def ensure_console() -> None:
    """Make the `pruning` loggers print at INFO level even when nothing configured logging."""
    logger = logging.getLogger(PACKAGE)
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
    if not any(isinstance(h, _FallbackConsole) for h in logger.handlers):
        logger.addHandler(_FallbackConsole())


def show_progress(requested: bool) -> bool:
    """Whether tqdm bars are drawn: when asked for (`progress: true`) and stderr is a terminal."""
    try:
        return bool(requested) and sys.stderr.isatty()
    except (AttributeError, ValueError):  # a closed or replaced stream
        return False

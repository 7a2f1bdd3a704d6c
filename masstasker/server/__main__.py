"""``python -m masstasker.server`` and the ``masstasker-server`` console script."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from collections.abc import Sequence

from masstasker import __version__
from masstasker.server.app import serve
from masstasker.server.config import Settings, from_environ

__all__ = ["main"]


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(settings: Settings) -> None:
    """Log to stderr, as text or one JSON object per line."""
    handler = logging.StreamHandler(sys.stderr)
    if settings.log_format == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())


def main(argv: Sequence[str] | None = None) -> int:
    """Parse flags and environment, then serve until SIGTERM/SIGINT."""
    settings = from_environ(argv, __version__)
    configure_logging(settings)
    log = logging.getLogger("masstasker.server.__main__")  # not __name__: that is "__main__" under python -m
    try:
        asyncio.run(serve(settings))
    except (OSError, ValueError) as exc:
        log.error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Fault injection for server subprocesses: put this directory on ``PYTHONPATH``.

With ``FAULTY_FSYNC_FLAG=<path>`` in the environment, every ``os.fsync`` and
``os.fdatasync`` of the process fails with EIO while a file exists at
``<path>`` (the test creates it when the disk should "break"). Python loads
``sitecustomize`` before the server is imported, so the log writer binds the
wrapped functions: the real writer path meets the failure, nothing of the
server is replaced.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable

_flag = os.environ.get("FAULTY_FSYNC_FLAG")


def _failing(real: Callable[[int], None], flag: str) -> Callable[[int], None]:
    def sync(fd: int) -> None:
        if os.path.exists(flag):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real(fd)

    return sync


if _flag:
    os.fsync = _failing(os.fsync, _flag)
    if hasattr(os, "fdatasync"):
        os.fdatasync = _failing(os.fdatasync, _flag)

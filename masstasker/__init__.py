"""MassTasker: a task-queue server and client, wire-compatible with the Go MassTasker."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("masstasker")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

__all__ = ["__version__"]

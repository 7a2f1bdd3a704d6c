"""The ``masstasker`` command line: groups, tasks, progress and retries over the admin API.

Install it with ``pip install 'masstasker[cli]'`` (click and rich). ``main(argv)`` runs it and returns
the exit code; docs/operating.md lists the commands and exit codes.
"""

from masstasker.cli.main import cli, main

__all__ = ["cli", "main"]

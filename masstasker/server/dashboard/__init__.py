"""The web dashboard on the server's HTTP listener: overview, group and task pages, live, with actions.

``Dashboard`` is the WSGI app (``http.py``); ``Calls`` runs the server's own RPC handlers in-process on
its event loop (``bridge.py``); ``static/`` holds the one page shell, its script and its style, which
ship in the package (no CDN, no build step).
"""

from masstasker.server.dashboard.bridge import CallFailed, Calls, Snapshots
from masstasker.server.dashboard.http import MODES, Dashboard

__all__ = ["MODES", "CallFailed", "Calls", "Dashboard", "Snapshots"]

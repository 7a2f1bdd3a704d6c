"""Where tasks live: one folder per store behind one asynchronous interface (:mod:`.base`).

``memory/``
    Every task in this process (the default), optionally logged to
    ``--data-dir``: the fastest, one server.
``postgres/``
    Tasks in a PostgreSQL database that any number of servers share
    (``--store postgresql://...``; ``pip install 'masstasker[postgres]'``).
    Imported only when selected: the in-memory server never loads a driver.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # config imports the durability package, which imports the in-memory store: no cycle at run time
    from masstasker.server.config import Settings
    from masstasker.server.stores.base import TaskStore

__all__ = ["open_store"]


async def open_store(settings: Settings, clock: Callable[[], int]) -> TaskStore:
    """The store ``settings.store`` names, opened (recovered, connected, migrated).

    Raises OSError when it cannot be reached or opened, ValueError when it is
    misconfigured (a driver missing, a schema newer than this server).
    """
    from masstasker.server.config import MEMORY_STORES
    from masstasker.server.stores.base import StoreUnavailable

    if settings.store in MEMORY_STORES:
        from masstasker.server.stores.memory.adapter import MemoryTaskStore

        return await MemoryTaskStore.open(settings, clock)
    try:
        from masstasker.server.stores.postgres.options import PgOptions
        from masstasker.server.stores.postgres.schema import SchemaTooNew
        from masstasker.server.stores.postgres.store import PostgresStore
    except ImportError as exc:
        raise ValueError(
            f"--store names a PostgreSQL database, but its driver is not installed ({exc}): "
            "pip install 'masstasker[postgres]'"
        ) from None
    options = PgOptions(
        dsn=settings.store,
        schema=settings.store_schema,
        pool_size=settings.store_pool_size,
        password_file=settings.store_password_file,
        poll_only=settings.store_poll_only,
    )
    try:
        return await PostgresStore.open(options, clock)
    except StoreUnavailable as exc:
        raise OSError(str(exc)) from None
    except SchemaTooNew as exc:
        raise ValueError(str(exc)) from None

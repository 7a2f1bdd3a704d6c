"""The in-memory store: every task in this process, optionally logged to a data directory.

``store``
    :class:`~.store.Store`: tasks, group indices, label index; no I/O.
``stats``
    The group statistics the store keeps on every commit: counters, lease
    and error indices, counter history.
``admin``
    The admin view (statistics and listings) read from them.
``waiters``
    Waiting Queries.
``adapter``
    All of it behind the store seam, with the data directory.
"""

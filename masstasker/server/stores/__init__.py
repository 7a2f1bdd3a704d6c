"""Where tasks live: one folder per store behind one asynchronous interface.

``postgres/``: tasks in a PostgreSQL database shared by any number of servers
(``pip install 'masstasker[postgres]'``; imported only when selected).
"""

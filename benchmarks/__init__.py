"""MassTasker benchmarks: how fast and how big the server goes (``python -m benchmarks``).

Modules: ``run`` (the command line), ``scenarios`` (what each scenario
does), ``loadgen`` and ``workloads`` (the load-generator processes and what
they call), ``procs`` (server subprocesses and /proc measurements),
``ceiling`` (the canned-answer server), ``payload`` (the benchmark tasks),
``report`` (table, targets, JSON), ``profiles`` (py-spy summaries).
"""

"""A MassTasker job, in the shape of the Go client's example.

One seed task starts the job. A bootstrap worker leases it and, in one atomic update, replaces it with
N work tasks. N workers then loop: lease a work task, do the work under ``run_with_lease`` (a heartbeat
keeps the lease alive however long the work takes), and commit — the result task is created and the work
task deleted in the same update, so a result is recorded exactly once even if a worker dies halfway.
Inputs that can never succeed raise ``SavedError`` and are parked in an error group, with the reason, for
a human to look at (and to move back with ``BulkSet`` once fixed).

Run it against a server::

    python -m masstasker.server --port 50053 --listen-http '' &
    python examples/job.py --target 127.0.0.1:50053 --tasks 20 --workers 4

``--target`` may also list several servers that share one PostgreSQL store, such as
``ipv4:127.0.0.1:50053,127.0.0.1:50054``: calls are spread over them round-robin (docs/postgres.md).

or, without ``--target``, against a server started in-process for the demo. The workers stop when the
seed and work groups are both empty; a real job's workers would simply keep waiting for more.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from masstasker import (
    Client,
    Create,
    DeadlineExceeded,
    Delete,
    LeaseLost,
    SavedError,
    Task,
    delete_or_move,
    is_saved_error,
    new_task,
    unpack_data,
)
from masstasker._pb import masstasker_pb2 as pb

log = logging.getLogger("job")


@dataclass(frozen=True)
class JobConfig:
    """Everything the job is told; the defaults suit a demo that finishes in seconds."""

    tasks: int = 20
    workers: int = 4
    seed_group: str = "bootstrap"
    work_group: str = "work"
    done_group: str = "done"
    error_group: str = "errors"
    own_for: float = 20.0  # each lease (and each renewal) lasts this long...
    heartbeat: float = 2.0  # ...and is renewed this often while the work runs
    work_time: float = 0.05  # pretend each task takes this long
    poll: float = 1.0  # how long an idle worker waits before checking whether the job is over
    bad_every: int = 5  # every so many inputs is malformed, to show the error group


def seed(client: Client, config: JobConfig) -> None:
    """Create the one task that starts the job (``--bootstrap-task-group`` makes the server do this)."""
    client.create(new_task(config.seed_group))


def job_inputs(config: JobConfig) -> list[str]:
    """The job's input records: numbers as text, with a malformed one every ``bad_every``."""
    return [f"n/a#{i}" if (i + 1) % config.bad_every == 0 else str(i) for i in range(config.tasks)]


def bootstrap(client: Client, config: JobConfig) -> None:
    """Turn each seed task into the job's work tasks, atomically: either all exist and the seed is gone, or
    nothing changed and another bootstrap worker may try again when the lease expires."""
    while not job_finished(client, config):
        try:
            seed_task = client.query(config.seed_group, config.own_for, timeout=config.poll)
        except DeadlineExceeded:
            continue
        work = [new_task(config.work_group, pb.Test(foo=record)) for record in job_inputs(config)]
        client.do(Delete(seed_task), Create(*work))
        log.info("bootstrap: created %d work tasks", len(work))


def process(task: Task, lost: threading.Event, config: JobConfig) -> Task:
    """The work: square a number. Returns the result task to create; raises ``SavedError`` for bad input."""
    record = unpack_data(task, pb.Test).foo
    try:
        number = int(record)
    except ValueError as exc:
        # Retrying will not make this parse: park it, with the reason, instead of looping on it forever.
        raise SavedError(exc) from exc
    if lost.wait(config.work_time):  # "working"; returns early if the lease is lost
        return task  # abandoned: run_with_lease raises LeaseLost anyway
    return new_task(config.done_group, pb.Test(foo=f"{number}^2={number * number}"))


def worker(client: Client, config: JobConfig, name: str) -> int:
    """Lease, work, commit, until the job is over. Returns how many tasks this worker committed."""
    committed = 0
    while True:
        try:
            task = client.query(config.work_group, config.own_for, timeout=config.poll)
        except DeadlineExceeded:
            if job_finished(client, config):
                return committed
            continue
        try:
            result = client.run_with_lease(
                task, lambda t, lost: process(t, lost, config), heartbeat=config.heartbeat, own_for=config.own_for
            )
        except LeaseLost:
            log.warning("%s: lost the lease on task %d; its new owner will do it", name, task.id)
            continue
        except Exception as exc:
            if not is_saved_error(exc):
                raise  # a bug or an outage: stop; the lease expires and another worker retries the task
            client.do(delete_or_move(config.error_group, task)(exc))
            log.info("%s: parked task %d: %s", name, task.id, exc)
        else:
            # The result and the removal of the work task commit together, or not at all.
            client.do(delete_or_move(config.error_group, task)(None), Create(result))
        committed += 1


def group_size(client: Client, group: str) -> int:
    """How many tasks ``group`` holds, leased ones included (via the raw ``Debug`` RPC)."""
    return int(client.rpc.Debug(pb.DebugRequest(group=group, limit=1)).num_tasks)


def job_finished(client: Client, config: JobConfig) -> bool:
    """Nothing left to bootstrap and nothing left to work on (leased tasks still count as left)."""
    return group_size(client, config.seed_group) == 0 and group_size(client, config.work_group) == 0


@dataclass(frozen=True)
class JobResult:
    """What the job left behind: the result payloads and the parked tasks' errors."""

    results: list[str]
    errors: list[str]
    committed: int


def run_job(target: str, config: JobConfig, *, create_seed: bool = True) -> JobResult:
    """Run the bootstrap worker and ``config.workers`` workers against ``target`` until the job is done."""
    # round_robin spreads calls over every address of a target list (gRPC's default, pick_first, would
    # send them all to the first); with one address it is the same as the default.
    with Client(target, options=[("grpc.lb_policy_name", "round_robin")]) as client:
        if create_seed:
            seed(client, config)
        with ThreadPoolExecutor(max_workers=config.workers + 1) as pool:
            boot = pool.submit(bootstrap, client, config)
            workers = [pool.submit(worker, client, config, f"worker-{i}") for i in range(config.workers)]
            boot.result()  # re-raises a failure in that thread
            committed = sum(w.result() for w in workers)
        done = client.rpc.Debug(pb.DebugRequest(group=config.done_group)).tasks
        parked = client.rpc.Debug(pb.DebugRequest(group=config.error_group)).tasks
        return JobResult(
            results=sorted(unpack_data(t, pb.Test).foo for t in done),
            errors=sorted(t.error for t in parked),
            committed=committed,
        )


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: parse flags, run the job, print a summary."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--target",
        help="server HOST:PORT, or a list such as ipv4:127.0.0.1:50053,127.0.0.1:50054 (default: start one in-process)",
    )
    parser.add_argument("--tasks", type=int, default=JobConfig.tasks)
    parser.add_argument("--workers", type=int, default=JobConfig.workers)
    parser.add_argument("--own-for", type=float, default=JobConfig.own_for, help="lease seconds")
    parser.add_argument("--heartbeat", type=float, default=JobConfig.heartbeat, help="renewal period, seconds")
    parser.add_argument("--work-time", type=float, default=JobConfig.work_time, help="fake work seconds per task")
    parser.add_argument("--poll", type=float, default=JobConfig.poll, help="idle wait before checking for the end")
    parser.add_argument("--no-seed", action="store_true", help="the server made the seed (--bootstrap-task-group)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    config = JobConfig(
        tasks=args.tasks,
        workers=args.workers,
        own_for=args.own_for,
        heartbeat=args.heartbeat,
        work_time=args.work_time,
        poll=args.poll,
    )
    if args.target:
        result = run_job(args.target, config, create_seed=not args.no_seed)
    else:
        from masstasker.server.app import BackgroundServer
        from masstasker.server.config import Settings

        with BackgroundServer(Settings(host="127.0.0.1", port=0, listen_http="")) as server:
            result = run_job(server.target, config)
    print(f"committed {result.committed} tasks: {len(result.results)} results, {len(result.errors)} parked")
    for error in result.errors:
        print(f"  parked: {error}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

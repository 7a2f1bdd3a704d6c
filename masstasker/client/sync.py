"""``Client``: the synchronous driver. All logic is in ``_core``; this module only makes blocking calls."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Sequence
from types import TracebackType
from typing import Any, TypeVar

import grpc

from masstasker._pb import masstasker_pb2 as pb
from masstasker._pb import masstasker_pb2_grpc as pb_grpc
from masstasker.client._auth import BearerInterceptor, resolve_token
from masstasker.client._core import (
    DEFAULT_HEARTBEAT,
    DEFAULT_OWN_FOR,
    DEFAULT_QUERY_RETRY_PAUSE,
    Call,
    ClientBase,
    ClockAdvanced,
    Flow,
    Pause,
    Tick,
    commit_or_move_ops,
    heartbeat_flow,
    resolve_target,
)
from masstasker.client._ops import Create, Delete, Disown, Move, Op, Pred, Reown, Update
from masstasker.client._time import AdvancingClock, Clock, Seconds
from masstasker.client.errors import StatusError, from_rpc_error

__all__ = ["Client"]

T = TypeVar("T")


class Client(ClientBase):
    """A synchronous MassTasker client that works on ``Task`` objects and keeps their IDs current.

    ``Client("host:port")`` dials an insecure channel (``Client()`` dials ``$MASSTASKER_TARGET``); pass
    ``credentials`` for TLS, ``token`` or ``MASSTASKER_TOKEN`` for a server that wants a bearer token.
    ``from_channel`` wraps a channel you made. Use it as a context manager or call ``close()``. ``rpc`` is
    the raw generated stub for anything the high-level methods do not cover (``BulkSet``, ``Debug``).

    Every method is safe to call from several threads at once.
    """

    rpc: pb_grpc.MassTaskerStub
    """The generated gRPC stub on this client's channel."""

    def __init__(
        self,
        target: str | None = None,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
        options: Sequence[tuple[str, Any]] = (),
        clock: Clock | None = None,
        query_retry_pause: Seconds = DEFAULT_QUERY_RETRY_PAUSE,
        wait_for_ready: bool = False,
    ) -> None:
        """Dial ``target`` (None: ``$MASSTASKER_TARGET``; ``TypeError`` if neither names a server, ``ValueError``
        for an empty string). ``clock`` stamps times (default: the system clock); ``query_retry_pause`` is how
        long a waiting ``query`` pauses when a server cannot wait (Go); ``wait_for_ready`` makes calls wait
        for the server to come up instead of failing with ``Unavailable``. ``token`` is sent as
        ``authorization: Bearer <token>`` on every call; None reads ``MASSTASKER_TOKEN``, ``""`` sends none.
        ``credentials`` come from ``grpc.ssl_channel_credentials`` (add a client key and certificate for
        a server that requires them)."""
        target = resolve_target(target)
        bearer = resolve_token(token)
        if credentials is None:
            channel = grpc.insecure_channel(target, options=options)
        else:
            channel = grpc.secure_channel(target, credentials, options=options)
        if bearer is not None:
            channel = grpc.intercept_channel(channel, BearerInterceptor(bearer))
        self._setup(channel, owns_channel=True)
        self._configure(clock=clock, query_retry_pause=query_retry_pause, wait_for_ready=wait_for_ready)

    @classmethod
    def from_channel(
        cls,
        channel: grpc.Channel,
        *,
        clock: Clock | None = None,
        query_retry_pause: Seconds = DEFAULT_QUERY_RETRY_PAUSE,
        wait_for_ready: bool = False,
    ) -> Client:
        """A client on an existing channel. The channel stays yours: ``close()`` leaves it open."""
        client = cls.__new__(cls)
        client._setup(channel, owns_channel=False)
        client._configure(clock=clock, query_retry_pause=query_retry_pause, wait_for_ready=wait_for_ready)
        return client

    def _setup(self, channel: grpc.Channel, *, owns_channel: bool) -> None:
        self.channel = channel
        self._owns_channel = owns_channel
        self.rpc = pb_grpc.MassTaskerStub(channel)

    def close(self) -> None:
        """Close the channel if this client opened it."""
        if self._owns_channel:
            self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- the driver ---------------------------------------------------------------------------------------

    def _run(self, flow: Flow[T], tick: Callable[[float], bool] | None = None) -> T:
        """Run ``flow``, doing the I/O it asks for; ``tick`` waits a heartbeat and says whether to go on."""
        reply: Any = None
        error: StatusError | ClockAdvanced | None = None
        while True:
            try:
                step = flow.send(reply) if error is None else flow.throw(error)
            except StopIteration as stop:
                result: T = stop.value
                return result
            reply, error = None, None
            if isinstance(step, Call):
                try:
                    reply = self._call(step)
                except grpc.RpcError as exc:
                    error = from_rpc_error(exc)
                except ClockAdvanced as exc:
                    error = exc
            elif isinstance(step, Pause):
                time.sleep(step.seconds)
            elif isinstance(step, Tick) and tick is not None:
                if not tick(step.seconds):
                    flow.close()
                    return None  # type: ignore[return-value]  # only heartbeat flows tick, and they return None
            else:
                raise TypeError(f"unexpected step {step!r}")

    def _call(self, step: Call) -> Any:
        """Make one call; a waiting Query on a clock that can jump is cancelled when it does."""
        method = getattr(self.rpc, step.method)
        clock = self.clock
        if step.stamped is None or not isinstance(clock, AdvancingClock):
            return method(step.request, timeout=step.timeout, wait_for_ready=self.wait_for_ready)
        future = method.future(step.request, timeout=step.timeout, wait_for_ready=self.wait_for_ready)
        moved = threading.Event()

        def on_advance() -> None:
            # A task the server took for us in this very instant would stay leased to nobody until its
            # lease ends (the window any deadline or cancellation has); a clock jump is rare enough.
            moved.set()
            future.cancel()

        stop_listening = clock.on_advance(on_advance)
        try:
            if clock.now() != step.stamped:
                on_advance()  # it moved between stamping the request and listening
            try:
                return future.result()
            except grpc.FutureCancelledError:
                raise ClockAdvanced from None
        finally:
            stop_listening()

    # -- the API --------------------------------------------------------------------------------------------

    def do(self, *ops: Op, timeout: Seconds | None = None) -> None:
        """Apply ``ops`` (``Create``, ``Delete``, ``Update``, ``Move``, ``Disown``, ``Reown``, ``Pred``) in one
        atomic Update. On success every created task object carries its new ID; on failure nothing the
        caller holds has changed and the error (``TaskNotFound``, ``PreconditionFailed``, …) is raised."""
        self._run(self._do_flow(ops, timeout))

    def query(self, group: str, own_for: Seconds, *, wait: bool = True, timeout: Seconds | None = None) -> pb.Task:
        """The head of ``group``, leased to you for ``own_for`` (it gets a new ID).

        ``own_for`` is required, as in the Go client: a worker that forgot it would work without a lease
        while others took the same task. ``own_for=0`` leases nothing, as ``peek`` does.
        ``wait=True`` waits for a task to become visible, up to ``timeout`` (then ``DeadlineExceeded``);
        ``wait=False`` raises ``TaskNotFound`` at once if none is visible.
        """
        return self._run(self._query_flow(group, own_for, wait=wait, max_tasks=1, many=False, timeout=timeout))[0]

    def query_many(
        self,
        group: str,
        max_tasks: int,
        own_for: Seconds,
        *,
        wait: bool = True,
        timeout: Seconds | None = None,
    ) -> list[pb.Task]:
        """Up to ``max_tasks`` visible tasks from the head of ``group``, each leased for ``own_for``, in one
        atomic step. ``wait`` returns once at least one is visible; ``wait=False`` returns ``[]`` if none is.
        A server that ignores ``max_tasks`` (Go) returns one task."""
        return self._run(self._query_flow(group, own_for, wait=wait, max_tasks=max_tasks, many=True, timeout=timeout))

    def peek(self, group: str, *, wait: bool = True, timeout: Seconds | None = None) -> pb.Task:
        """The head of ``group`` without leasing it (``query(group, 0)``): it keeps its ID and stays visible."""
        return self._run(self._query_flow(group, 0, wait=wait, max_tasks=1, many=False, timeout=timeout))[0]

    def peek_many(
        self, group: str, max_tasks: int, *, wait: bool = True, timeout: Seconds | None = None
    ) -> list[pb.Task]:
        """Up to ``max_tasks`` visible tasks from the head of ``group`` without leasing them."""
        return self._run(self._query_flow(group, 0, wait=wait, max_tasks=max_tasks, many=True, timeout=timeout))

    def run_with_lease(
        self,
        task: pb.Task,
        fn: Callable[[pb.Task, threading.Event], T],
        *,
        heartbeat: Seconds = DEFAULT_HEARTBEAT,
        own_for: Seconds = DEFAULT_OWN_FOR,
    ) -> T:
        """Run ``fn(task, lost)`` while a background thread renews the lease on ``task`` every ``heartbeat``
        (each renewal owns it for ``own_for`` more) and return what ``fn`` returns.

        Afterwards — also when ``fn`` raises — ``task`` carries the current ID, ready to commit. If a renewal
        finds that someone else owns the task, the event ``lost`` is set (long work should check it and
        stop) and, once ``fn`` returns, ``LeaseLost`` is raised instead of its result.

        Commit after this returns, not inside ``fn``: while it runs, the ID the work sees may already have
        been renewed away (the heartbeat renews its own copy so that the two never race).
        """
        lease = self._lease(task, heartbeat, own_for)
        lost = threading.Event()
        cond = threading.Condition()

        def tick(seconds: float) -> bool:
            with cond:
                return not self.clock.wait_for(cond, lambda: lease.released, seconds)

        def beat() -> None:
            try:
                self._run(heartbeat_flow(lease), tick)
            except Exception as exc:
                lease.error = exc
                lost.set()

        thread = threading.Thread(target=beat, name=f"masstasker-heartbeat-{task.id}", daemon=True)
        thread.start()

        def release() -> None:
            with cond:
                lease.released = True
                cond.notify_all()
            # An in-flight renewal is allowed to finish, so the ID written back is the one the server has.
            thread.join()
            lease.finish()

        try:
            result = fn(task, lost)
        except Exception:
            release()
            if lease.error is not None:
                raise lease.error  # noqa: B904  # the work's error stays attached as __context__
            raise
        except BaseException:
            release()
            raise
        release()
        if lease.error is not None:
            raise lease.error
        return result

    # -- one-liners over do(), as the Go client's (deprecated there) methods ----------------------------------

    # Each takes ``timeout`` (real seconds for the one Update) as ``do`` does.

    def create(self, *tasks: pb.Task, timeout: Seconds | None = None) -> None:
        """Create the tasks; each object gets its new ID."""
        self.do(Create(*tasks), timeout=timeout)

    def update(self, *tasks: pb.Task, timeout: Seconds | None = None) -> None:
        """Replace each task by its current content; each object gets its new ID."""
        self.do(Update(*tasks), timeout=timeout)

    def delete(self, *tasks: pb.Task, timeout: Seconds | None = None) -> None:
        """Delete the tasks by ID."""
        self.do(Delete(*tasks), timeout=timeout)

    def complex_update(
        self,
        create: Iterable[pb.Task] = (),
        delete: Iterable[pb.Task] = (),
        predicates: Iterable[pb.Task] = (),
        *,
        timeout: Seconds | None = None,
    ) -> None:
        """Create, delete and check predicates in one atomic Update."""
        self.do(Create(*create), Delete(*delete), Pred(*predicates), timeout=timeout)

    def move(self, group: str, *tasks: pb.Task, timeout: Seconds | None = None) -> None:
        """Move the tasks to ``group`` (new IDs)."""
        self.do(Move(group, *tasks), timeout=timeout)

    def disown(self, *tasks: pb.Task, timeout: Seconds | None = None) -> None:
        """Give up the lease: make the tasks visible again now (new IDs)."""
        self.do(Disown(*tasks), timeout=timeout)

    def reown(self, own_for: Seconds, *tasks: pb.Task, timeout: Seconds | None = None) -> None:
        """Lease the tasks until now + ``own_for`` (new IDs)."""
        self.do(Reown(own_for, *tasks), timeout=timeout)

    def commit_or_move(
        self, task: pb.Task, exc: BaseException | None, error_group: str, *, timeout: Seconds | None = None
    ) -> None:
        """Delete ``task`` if ``exc`` is None; move it to ``error_group`` if ``exc`` is a saved error (and
        ``error_group`` is not empty); otherwise disown it, so it is retried soon, and raise ``exc``."""
        op, reraise = commit_or_move_ops(task, exc, error_group)
        self.do(op, timeout=timeout)
        if reraise is not None:
            raise reraise

"""``AsyncClient``: the asyncio driver (``grpc.aio``). All logic is in ``_core``; this module only awaits."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterable, Sequence
from types import TracebackType
from typing import Any, TypeVar

import grpc
from grpc import aio

from masstasker._pb import masstasker_pb2 as pb
from masstasker._pb import masstasker_pb2_grpc as pb_grpc
from masstasker.client._auth import AsyncBearerInterceptor, resolve_token
from masstasker.client._core import (
    DEFAULT_HEARTBEAT,
    DEFAULT_OWN_FOR,
    DEFAULT_QUERY_RETRY_PAUSE,
    Call,
    ClientBase,
    ClockAdvanced,
    Flow,
    Lease,
    Pause,
    Tick,
    commit_or_move_ops,
    heartbeat_flow,
    resolve_target,
)
from masstasker.client._ops import Create, Delete, Disown, Move, Op, Pred, Reown, Update
from masstasker.client._time import AdvancingClock, Clock, Seconds
from masstasker.client.errors import StatusError, from_rpc_error

__all__ = ["AsyncClient"]

T = TypeVar("T")


class AsyncClient(ClientBase):
    """The asyncio twin of ``Client``: the same methods and behaviour, awaited.

    A ``grpc.aio`` channel belongs to the event loop it was made in, so ``AsyncClient(target)`` makes its
    channel lazily, in the running loop at the first call — you may construct it anywhere — and makes a
    fresh one if later used from another loop (say, a second ``asyncio.run``). ``from_channel`` wraps a
    channel you made, which stays yours. Use ``async with`` or ``await close()``.
    """

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
        """Remember how to dial ``target`` (checked now); the options are those of ``Client``."""
        self.target = resolve_target(target)
        self._credentials = credentials
        bearer = resolve_token(token)  # now, so a bad MASSTASKER_TOKEN fails here and not at the first call
        # Typed loosely: the stubs type aio interceptors as a placeholder.
        self._interceptors: list[Any] | None = [AsyncBearerInterceptor(bearer)] if bearer is not None else None
        self._options = tuple(options)
        self._channel: aio.Channel | None = None
        self._stub: pb_grpc.MassTaskerAsyncStub | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._owns_channel = True
        self._configure(clock=clock, query_retry_pause=query_retry_pause, wait_for_ready=wait_for_ready)

    @classmethod
    def from_channel(
        cls,
        channel: aio.Channel,
        *,
        clock: Clock | None = None,
        query_retry_pause: Seconds = DEFAULT_QUERY_RETRY_PAUSE,
        wait_for_ready: bool = False,
    ) -> AsyncClient:
        """A client on an existing ``grpc.aio`` channel. The channel stays yours: ``close()`` leaves it open."""
        client = cls.__new__(cls)
        client.target = ""
        client._credentials = None
        client._interceptors = None
        client._options = ()
        client._channel = channel
        client._stub = pb_grpc.MassTaskerStub(channel)
        client._loop = None  # not ours to re-make, whatever loop it is on
        client._owns_channel = False
        client._configure(clock=clock, query_retry_pause=query_retry_pause, wait_for_ready=wait_for_ready)
        return client

    @property
    def rpc(self) -> pb_grpc.MassTaskerAsyncStub:
        """The generated ``grpc.aio`` stub on this client's channel (made in the running loop if need be)."""
        if self._owns_channel:
            loop = asyncio.get_running_loop()  # RuntimeError outside a loop: the channel needs one
            if self._stub is None or self._loop is not loop:
                # The old channel, if any, died with its loop; nothing to close on a loop that is gone.
                self._channel = self._make_channel()
                self._stub = pb_grpc.MassTaskerStub(self._channel)
                self._loop = loop
        assert self._stub is not None
        return self._stub

    def _make_channel(self) -> aio.Channel:
        if self._credentials is None:
            return aio.insecure_channel(self.target, options=self._options, interceptors=self._interceptors)
        return aio.secure_channel(
            self.target, self._credentials, options=self._options, interceptors=self._interceptors
        )

    async def close(self) -> None:
        """Close the channel if this client opened it."""
        channel, self._channel, self._stub, self._loop = self._channel, None, None, None
        if self._owns_channel and channel is not None:
            await channel.close(None)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # -- the driver ---------------------------------------------------------------------------------------

    async def _run(self, flow: Flow[T], tick: Callable[[float], Awaitable[bool]] | None = None) -> T:
        """Run ``flow``, awaiting the I/O it asks for; ``tick`` waits a heartbeat and says whether to go on."""
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
                    reply = await self._call(step)
                except grpc.RpcError as exc:
                    error = from_rpc_error(exc)
                except ClockAdvanced as exc:
                    error = exc
            elif isinstance(step, Pause):
                await asyncio.sleep(step.seconds)
            elif isinstance(step, Tick) and tick is not None:
                if not await tick(step.seconds):
                    flow.close()
                    return None  # type: ignore[return-value]  # only heartbeat flows tick, and they return None
            else:
                raise TypeError(f"unexpected step {step!r}")

    async def _call(self, step: Call) -> Any:
        """Make one call; a waiting Query on a clock that can jump is cancelled when it does (see ``Client``)."""
        call = getattr(self.rpc, step.method)(step.request, timeout=step.timeout, wait_for_ready=self.wait_for_ready)
        clock = self.clock
        if step.stamped is None or not isinstance(clock, AdvancingClock):
            return await call
        loop = asyncio.get_running_loop()
        moved = False

        def cancel() -> None:
            nonlocal moved
            moved = True
            call.cancel()

        def on_advance() -> None:  # on the advancing thread, maybe not this loop's
            with contextlib.suppress(RuntimeError):  # the loop is closed: nothing is waiting any more
                loop.call_soon_threadsafe(cancel)

        stop_listening = clock.on_advance(on_advance)
        try:
            if clock.now() != step.stamped:
                cancel()  # it moved between stamping the request and listening
            return await call
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if moved and (task is None or task.cancelling() == 0):
                raise ClockAdvanced from None
            raise  # our caller cancelled us
        finally:
            stop_listening()

    async def _beat(self, lease: Lease, released: asyncio.Event) -> None:
        """The heartbeat task: renew until released; record why it stopped early, if it did."""

        async def tick(seconds: float) -> bool:
            sleeper = asyncio.ensure_future(self.clock.sleep(seconds))
            release = asyncio.ensure_future(released.wait())
            try:
                await asyncio.wait({sleeper, release}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in (sleeper, release):
                    waiter.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await waiter
            return not released.is_set()

        try:
            await self._run(heartbeat_flow(lease), tick)
        except Exception as exc:
            lease.error = exc

    # -- the API --------------------------------------------------------------------------------------------

    async def do(self, *ops: Op, timeout: Seconds | None = None) -> None:
        """Apply ``ops`` in one atomic Update; see ``Client.do``."""
        await self._run(self._do_flow(ops, timeout))

    async def query(
        self, group: str, own_for: Seconds, *, wait: bool = True, timeout: Seconds | None = None
    ) -> pb.Task:
        """The head of ``group``, leased for ``own_for`` (required; 0 peeks); see ``Client.query``."""
        flow = self._query_flow(group, own_for, wait=wait, max_tasks=1, many=False, timeout=timeout)
        return (await self._run(flow))[0]

    async def query_many(
        self,
        group: str,
        max_tasks: int,
        own_for: Seconds,
        *,
        wait: bool = True,
        timeout: Seconds | None = None,
    ) -> list[pb.Task]:
        """Up to ``max_tasks`` visible tasks from the head of ``group``; see ``Client.query_many``."""
        return await self._run(
            self._query_flow(group, own_for, wait=wait, max_tasks=max_tasks, many=True, timeout=timeout)
        )

    async def peek(self, group: str, *, wait: bool = True, timeout: Seconds | None = None) -> pb.Task:
        """The head of ``group`` without leasing it; see ``Client.peek``."""
        flow = self._query_flow(group, 0, wait=wait, max_tasks=1, many=False, timeout=timeout)
        return (await self._run(flow))[0]

    async def peek_many(
        self, group: str, max_tasks: int, *, wait: bool = True, timeout: Seconds | None = None
    ) -> list[pb.Task]:
        """Up to ``max_tasks`` visible tasks from the head of ``group`` without leasing them."""
        return await self._run(self._query_flow(group, 0, wait=wait, max_tasks=max_tasks, many=True, timeout=timeout))

    async def run_with_lease(
        self,
        task: pb.Task,
        fn: Callable[[pb.Task, asyncio.Event], Awaitable[T]],
        *,
        heartbeat: Seconds = DEFAULT_HEARTBEAT,
        own_for: Seconds = DEFAULT_OWN_FOR,
    ) -> T:
        """Run ``await fn(task, lost)`` while a heartbeat task renews the lease every ``heartbeat`` (each renewal
        owns it for ``own_for`` more), and return its result — the same call as ``Client.run_with_lease``.

        Afterwards — also when ``fn`` raises or this call is cancelled — ``task`` carries the current ID. If a
        renewal finds that someone else owns the task, the ``asyncio.Event`` ``lost`` is set, ``fn`` is
        cancelled (asyncio's way to stop work, so work need not poll ``lost``) and ``LeaseLost`` is raised.
        Commit after this returns, not inside ``fn`` (see ``Client.run_with_lease``).
        """
        lease = self._lease(task, heartbeat, own_for)
        released = asyncio.Event()
        lost = asyncio.Event()
        # The work first: if fn is not a coroutine function, nothing is left running.
        work = asyncio.ensure_future(fn(task, lost))
        beat = asyncio.ensure_future(self._beat(lease, released))
        try:
            await asyncio.wait({work, beat}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            # The heartbeat ends early only when it cannot renew; work on a lost lease is wasted. (Also
            # reached when this call is cancelled: the work goes with it.)
            if not work.done():
                if lease.error is not None:
                    lost.set()  # before the cancellation, so cleanup in the work can tell why
                work.cancel()
                await asyncio.wait({work})
            released.set()
            # An in-flight renewal is allowed to finish, so the ID written back is the one the server has.
            await asyncio.wait({beat})
            lease.finish()
        if lease.error is not None:
            if not work.cancelled() and work.exception() is not None:
                lease.error.__context__ = work.exception()
            raise lease.error
        return work.result()

    # -- one-liners over do(), as the Go client's (deprecated there) methods ----------------------------------

    # Each takes ``timeout`` (real seconds for the one Update) as ``do`` does.

    async def create(self, *tasks: pb.Task, timeout: Seconds | None = None) -> None:
        """Create the tasks; each object gets its new ID."""
        await self.do(Create(*tasks), timeout=timeout)

    async def update(self, *tasks: pb.Task, timeout: Seconds | None = None) -> None:
        """Replace each task by its current content; each object gets its new ID."""
        await self.do(Update(*tasks), timeout=timeout)

    async def delete(self, *tasks: pb.Task, timeout: Seconds | None = None) -> None:
        """Delete the tasks by ID."""
        await self.do(Delete(*tasks), timeout=timeout)

    async def complex_update(
        self,
        create: Iterable[pb.Task] = (),
        delete: Iterable[pb.Task] = (),
        predicates: Iterable[pb.Task] = (),
        *,
        timeout: Seconds | None = None,
    ) -> None:
        """Create, delete and check predicates in one atomic Update."""
        await self.do(Create(*create), Delete(*delete), Pred(*predicates), timeout=timeout)

    async def move(self, group: str, *tasks: pb.Task, timeout: Seconds | None = None) -> None:
        """Move the tasks to ``group`` (new IDs)."""
        await self.do(Move(group, *tasks), timeout=timeout)

    async def disown(self, *tasks: pb.Task, timeout: Seconds | None = None) -> None:
        """Give up the lease: make the tasks visible again now (new IDs)."""
        await self.do(Disown(*tasks), timeout=timeout)

    async def reown(self, own_for: Seconds, *tasks: pb.Task, timeout: Seconds | None = None) -> None:
        """Lease the tasks until now + ``own_for`` (new IDs)."""
        await self.do(Reown(own_for, *tasks), timeout=timeout)

    async def commit_or_move(
        self, task: pb.Task, exc: BaseException | None, error_group: str, *, timeout: Seconds | None = None
    ) -> None:
        """See ``Client.commit_or_move``."""
        op, reraise = commit_or_move_ops(task, exc, error_group)
        await self.do(op, timeout=timeout)
        if reraise is not None:
            raise reraise

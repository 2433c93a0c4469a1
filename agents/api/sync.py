"""``dspyrt.connect_sync()``: the same verbs as blocking calls, for scripts and notebooks.

    client = dspyrt.connect_sync()          # or: with dspyrt.connect_sync() as client:
    result = client.optimize(Topic, trainset)
    client.close()

The client owns a thread running its own event loop (an anyio blocking portal), where the connection and every
request live; each method blocks the calling thread until its call on that loop returns. The caller's own event
loop, if any (Jupyter runs one), is never used, so the facade works inside a running loop as well as outside one.
A progress callback runs on the client's thread. After ``close()`` (or the ``with`` block) every call is refused.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from types import TracebackType
from typing import Concatenate, ParamSpec, TypeVar

from anyio.from_thread import start_blocking_portal

from dspyrt.agents.api.client import DSPyClient, connect
from dspyrt.agents.api.remote import RemoteProgram
from dspyrt.bus import DspyrtError
from dspyrt.runtime.config import IntegrationConfig

P = ParamSpec("P")
T = TypeVar("T")


async def _awaited(awaitable: Awaitable[T]) -> T:
    return await awaitable


def _blocking(
    method: Callable[Concatenate[DSPyClient, P], Awaitable[T]],
) -> Callable[Concatenate[SyncDSPyClient, P], T]:
    """``method`` of :class:`DSPyClient` as a blocking call: same arguments, its awaited result."""

    def call(self: SyncDSPyClient, /, *args: P.args, **kwargs: P.kwargs) -> T:
        client = self.aio  # refuses a closed client
        return self._portal.call(_awaited, method(client, *args, **kwargs))

    call.__name__ = method.__name__
    call.__qualname__ = f"SyncDSPyClient.{method.__name__}"
    call.__doc__ = method.__doc__
    return call


class SyncDSPyClient:
    """:class:`DSPyClient`'s verbs as blocking calls (see the module docstring). Made by :func:`connect_sync`."""

    def __init__(self, config: IntegrationConfig | None = None, *, identity: str | None = None) -> None:
        self._stack = ExitStack()
        try:
            self._portal = self._stack.enter_context(start_blocking_portal())
            self._client: DSPyClient | None = self._stack.enter_context(
                self._portal.wrap_async_context_manager(connect(config, identity=identity))
            )
        except BaseException:
            self._stack.close()
            raise

    @property
    def aio(self) -> DSPyClient:
        """The async client underneath (its coroutines run on this client's thread only)."""
        if self._client is None:
            raise DspyrtError("this client is closed", code="closed")
        return self._client

    optimize = _blocking(DSPyClient.optimize)
    cycle = _blocking(DSPyClient.cycle)
    evaluate = _blocking(DSPyClient.evaluate)
    refine_role = _blocking(DSPyClient.refine_role)
    validate = _blocking(DSPyClient.validate)
    predict = _blocking(DSPyClient.predict)
    load = _blocking(DSPyClient.load)
    put_dataset = _blocking(DSPyClient.put_dataset)

    def program(self, name: str, version: int | None = None) -> RemoteProgram:
        """The deployed program ``name`` as a ``dspy.Module`` (see :class:`RemoteProgram`); call it from any
        thread, this one included."""
        return self.aio.program(name, version)

    def close(self) -> None:
        """Disconnect and stop the client's thread (calls in flight are cancelled). Safe to call twice."""
        self._client = None
        self._stack.close()

    def __enter__(self) -> SyncDSPyClient:
        self.aio  # noqa: B018 - refuse a closed client
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def connect_sync(config: IntegrationConfig | None = None, *, identity: str | None = None) -> SyncDSPyClient:
    """A connected :class:`SyncDSPyClient`; the system is found as :func:`dspyrt.connect` finds it. Close it (or use
    it in a ``with`` block) when done."""
    return SyncDSPyClient(config, identity=identity)

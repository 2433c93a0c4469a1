"""A deployed program as a ``dspy.Module``: ``RemoteProgram``, from ``client.program(name)``.

Its ``forward(**inputs)`` is one ``serving.predict`` request, answered by the deployed version (the active one, its
canary's share of the time, or the version asked for), returned as a ``dspy.Prediction``; so it composes inside a
user's own ``dspy.Module``. The request runs on the client's event loop; the caller's current OpenTelemetry span is
its parent, so the serving agent's span (and every LM call under it) lands in the caller's trace.

DSPy calls ``forward`` synchronously. It blocks the calling thread until the reply, which works from any thread but
the client's event loop thread: with :func:`dspyrt.connect_sync` (a notebook, a script) that is every thread of
yours; with :func:`dspyrt.connect` call ``await program.acall(...)`` in async code, and ``program(...)`` from
worker threads (``dspy.Parallel``, ``dspy.Evaluate``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import dspy

if TYPE_CHECKING:
    from dspyrt.agents.api.client import DSPyClient
    from dspyrt.agents.loop.models import PredictReply


class RemoteProgram(dspy.Module):  # type: ignore[misc]
    """A deployed program (``program_name``, at ``version`` or the active one) called through ``serving.predict``.

    The last reply's version, model and prediction id are not part of the prediction (its fields are the program's
    outputs only); ``client.predict(...)`` returns the whole reply."""

    def __init__(self, client: DSPyClient, program_name: str, version: int | None = None) -> None:
        super().__init__()
        self._client = client
        self.program_name = program_name
        self.version = version

    def forward(self, **inputs: Any) -> dspy.Prediction:
        reply = self._client.call_from_thread(lambda: self._predict(inputs))
        return _prediction(reply)

    async def aforward(self, **inputs: Any) -> dspy.Prediction:
        reply = await self._client.call_on_loop(lambda: self._predict(inputs))
        return _prediction(reply)

    async def _predict(self, inputs: dict[str, Any]) -> PredictReply:
        return await self._client.predict(self.program_name, inputs, version=self.version)

    def __deepcopy__(self, memo: dict[int, Any]) -> RemoteProgram:
        # Optimizers and dspy.Parallel copy programs: a copy calls the same deployment over the same connection.
        copied = RemoteProgram(self._client, self.program_name, self.version)
        memo[id(self)] = copied
        return copied

    def __copy__(self) -> RemoteProgram:
        return RemoteProgram(self._client, self.program_name, self.version)

    def __repr__(self) -> str:
        at = f" v{self.version}" if self.version is not None else ""
        return f"RemoteProgram({self.program_name}{at})"


def _prediction(reply: PredictReply) -> dspy.Prediction:
    return dspy.Prediction(**reply.outputs)

"""Child tasks: a task handler submits another task and waits for its result, with a declared failure rule.

    shard = await submit_child_and_wait(
        agent.client, "evaluate-shard", request, ShardResult, task_id=f"{ctx.task_id}-s3", on_failure="fail"
    )

What a child that did not succeed means for its parent is declared at the call, never re-derived by hand:

- ``on_failure="fail"``: the parent fails at once: :class:`~dspyrt.bus.errors.PermanentError` with the child's
  error code and a message naming the child and its error;
- ``on_failure="retry"``: the parent is delivered again later: :class:`~dspyrt.bus.errors.RetryableError`, same code and
  message, so the parent's own :class:`~dspyrt.runtime.agent.RetryPolicy` bounds it.

``on_dead`` (default: ``on_failure``) overrides the rule for a child that ended ``dead`` (it ran out of attempts,
or its workers kept crashing) rather than ``failed`` (its handler refused it for good). A child still unfinished
after ``timeout`` seconds counts as failed: the rule applies, with code ``timeout``.

A child's id is chosen by its parent (``<parent id>-<suffix>``), so a redelivered parent finds the same child:
running or finished, it is not started twice. The parent's redelivery therefore waits for that same child again; a
child that already ended is not run again (its record stands) unless its id changes with the parent's attempt.
Trace context follows: the child's submit carries the parent's span, so parent and child are one trace.
"""

from __future__ import annotations

from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ValidationError

from dspyrt.bus import MessageValidationError, PermanentError, RetryableError, TaskError, TaskRecord, TaskStatus
from dspyrt.bus.messages import field_errors_of
from dspyrt.runtime.client import Client

M = TypeVar("M", bound=BaseModel)

ChildFailureRule = Literal["fail", "retry"]

__all__ = ["ChildFailureRule", "submit_child_and_wait"]


async def submit_child_and_wait(
    client: Client,
    kind: str,
    input: BaseModel | dict[str, Any],
    output: type[M],
    *,
    task_id: str,
    on_failure: ChildFailureRule,
    on_dead: ChildFailureRule | None = None,
    timeout: float | None = None,
) -> M:
    """Submit the child task ``kind`` under ``task_id``, wait until it ends, and return its result as ``output``.

    A child that did not succeed raises what ``on_failure`` (``on_dead`` for a ``dead`` child) declares; one still
    running after ``timeout`` seconds (None: wait as long as it takes) counts as failed, code ``timeout``. A result
    that is not an ``output`` fails the parent (``invalid_message``): the stored result will not change."""
    for rule in (on_failure, on_dead):
        if rule not in (None, "fail", "retry"):
            raise ValueError(f"a child's failure rule is 'fail' or 'retry', not {rule!r}")
    await client.submit(kind, input, task_id=task_id)
    try:
        record = await client.result(task_id, timeout=timeout, kind=kind)
    except TimeoutError:
        if timeout is None:
            raise
        message = f"{kind} task {task_id} did not finish within the parent's wait of {timeout:g}s"
        raise _failure(on_failure, message, "timeout") from None
    if record.status is TaskStatus.SUCCEEDED:
        try:
            return output.model_validate(record.result)
        except ValidationError as exc:
            errors = field_errors_of(exc)
            raise MessageValidationError(
                f"{kind} task {task_id} succeeded but its result is no {output.__name__}: {exc.error_count()} error(s)"
                + (f" ({errors[0].loc}: {errors[0].message})" if errors else ""),
                errors,
            ) from exc
    rule = (on_dead or on_failure) if record.status is TaskStatus.DEAD else on_failure
    raise _failure(rule, _ended(record), record.error.code if record.error else None)


def _ended(record: TaskRecord) -> str:
    error = record.error
    return f"{record.kind} task {record.id} ended {record.status.value}: " + (
        error.message if error else "no error recorded"
    )


def _failure(rule: ChildFailureRule, message: str, code: str | None) -> TaskError:
    if rule == "retry":
        return RetryableError(message, code=code)
    return PermanentError(message, code=code)

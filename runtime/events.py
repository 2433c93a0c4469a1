"""The runtime's own events: what the agent runtime publishes whatever the agent (the agents' events live in their
areas' ``models.py``).

``task.progress.<kind>.<task id>``  :class:`TaskProgress`, from ``TaskContext.progress`` in any task handler
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from dspyrt.bus.events import EventData


class TaskProgress(EventData):
    """How far a running task is (``dspyrt submit --wait`` draws it as a progress bar). A handler may add figures
    of its own beside these (the optimizer: ``lm_calls``, ``best_score``, ...); they are kept as extra fields."""

    topic: ClassVar[str] = "task.progress.*.*"

    task_id: str = Field(description="the task's id (also the topic's last token)")
    phase: str = Field(description="what the task is doing now, in the handler's words")
    step: int | None = Field(default=None, ge=0, description="steps done so far, when the handler counts them")
    total: int | None = Field(default=None, ge=0, description="steps in all, when the handler knows")

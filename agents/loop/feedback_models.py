"""Payloads of production feedback on the serving agent: ``record``, ``predictions``, ``feedback``, and the
recorded prediction itself (see :mod:`dspyrt.agents.loop.feedback`)."""

from __future__ import annotations

import time
from typing import Any

from pydantic import Field

from dspyrt.bus import Message

PROGRAM_NAME = r"^[A-Za-z0-9_-]{1,64}$"  # as agents.loop.models: a program name is one subject/KV token
PREDICTION_ID = r"^[0-9a-f]{24}$"
MAX_LIST = 1000
MAX_BATCH = 1000


class RecordRequest(Message):
    """Record a share of a program's predictions (``serving.record``); 0 turns recording off."""

    program: str = Field(pattern=PROGRAM_NAME)
    sample_rate: float = Field(ge=0.0, le=1.0)


class RecordSettings(Message):
    """A program's recording setting (kept in KV, so it changes without a redeploy)."""

    program: str
    sample_rate: float = 0.0
    updated_at: float | None = None


class RecordedPrediction(Message):
    """One sampled ``predict`` call, and the correction it received, if any."""

    prediction_id: str
    program: str
    version: int
    model: str
    inputs: dict[str, Any]
    outputs: dict[str, Any]
    trace_id: str | None = None
    canary: bool = False
    time: float = Field(default_factory=time.time)
    corrections: dict[str, Any] | None = None  # output field -> the correct value
    corrected_at: float | None = None
    agreed: bool | None = None  # every corrected field equals what the program answered

    @property
    def corrected(self) -> bool:
        return self.corrections is not None


class PredictionsRequest(Message):
    """A program's newest recorded predictions (``serving.predictions``)."""

    program: str = Field(pattern=PROGRAM_NAME)
    limit: int = Field(default=20, ge=1, le=MAX_LIST)


class PredictionList(Message):
    program: str
    sample_rate: float
    predictions: list[RecordedPrediction]  # newest first
    truncated: bool = False  # more were asked for than fit in one reply


class FeedbackItem(Message):
    """The correct values of some output fields of one recorded prediction."""

    prediction_id: str = Field(pattern=PREDICTION_ID)
    outputs: dict[str, Any] = Field(min_length=1)


class FeedbackRequest(Message):
    """A batch of corrections (``serving.feedback``): one new version of the program's feedback dataset.

    ``program`` is optional: the predictions name it; given, every prediction must be that program's."""

    items: list[FeedbackItem] = Field(min_length=1, max_length=MAX_BATCH)
    program: str | None = Field(default=None, pattern=PROGRAM_NAME)


class FeedbackTally(Message):
    """Corrections of one program version in a batch, and how many agreed with what it had answered."""

    version: int
    count: int
    agreed: int


class FeedbackReply(Message):
    program: str
    dataset: str  # NAME@VERSION of the feedback dataset's new version
    rows: int  # rows in that version
    count: int  # new corrections in this batch
    agreed: int  # of them, those that agreed with the recorded outputs
    repeated: int = 0  # corrections the predictions already had (a batch sent again): not counted twice
    versions: list[FeedbackTally]  # the new corrections by program version (what feedback.recorded reports)

"""Production feedback: sampled predictions are recorded; corrections of them become a versioned feedback dataset
that the next cycle trains on (``CycleRequest.include_feedback``).

Storage:

- KV bucket ``<PREFIX>_predictions`` (entries expire after ``RETENTION``; past ``MAX_BYTES`` the oldest go first):
  ``<program>.<prediction id>`` → :class:`RecordedPrediction`. A prediction id is 24 hex digits, the first 12 the
  milliseconds since the epoch, so a program's keys sort by time and one wildcard listing (``<program>.*``) finds
  them without reading any other program's records; ``*.<id>`` finds one record by its id alone.
- KV bucket ``<PREFIX>_feedback`` (no expiry): ``settings.<program>`` the program's sample rate (default: off), and
  ``head.<program>`` the feedback dataset version the last batch wrote: the compare-and-swap point that orders
  batches, so two at once (on any replicas) both land.
- Dataset ``<program>-feedback`` (:mod:`dspyrt.runtime.datasets`): one version per batch, the previous version's rows
  plus the batch's, a later correction of the same inputs replacing the earlier one. A row is the prediction's inputs
  and outputs with the corrected fields overridden.

Recording never fails a prediction: a failed or too-large record is logged and counted (the serving agent's
``recording`` health check shows the counts).
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
from nats.js.errors import KeyDeletedError, KeyNotFoundError
from nats.js.kv import KeyValue
from pydantic import ValidationError

from dspyrt.agents.loop.feedback_models import (
    FeedbackItem,
    FeedbackReply,
    FeedbackRequest,
    FeedbackTally,
    RecordedPrediction,
    RecordSettings,
)
from dspyrt.agents.loop.models import feedback_dataset as feedback_reference
from dspyrt.bus import Bus, Message, MessageValidationError, NotFoundError, StreamLayout
from dspyrt.bus.errors import FieldError
from dspyrt.bus.messages import clip
from dspyrt.bus.streams import cache_bucket, key_value, kv_keys_matching, kv_update
from dspyrt.runtime.datasets import (
    DatasetIndex,
    DatasetManifest,
    DatasetNotFoundError,
    DatasetRef,
    DatasetStore,
    RowError,
    canonical_row,
)

log = logging.getLogger("dspyrt.feedback")

PREDICTIONS_BUCKET = "predictions"
FEEDBACK_BUCKET = "feedback"
RETENTION = 30 * 24 * 3600.0
"""Seconds a recorded prediction is kept."""
MAX_BYTES = 1024 * 1024 * 1024
"""Recorded predictions kept at most (the oldest are dropped first)."""
SETTINGS_TTL = 2.0
"""Seconds a replica keeps a program's sample rate before reading it again (the replica that sets it: at once)."""
RECORD_TIMEOUT = 2.0
FEEDBACK_SOURCE = "feedback"
"""The ``source`` of the dataset versions feedback batches write (a version put by hand has its file name)."""
_ATTEMPTS = 20
_LISTED = 5  # ids / fields named in one error


def new_prediction_id(now: float | None = None) -> str:
    """24 hex digits: the time in milliseconds (12), then 48 random bits. Sorts by time; unique in practice."""
    ms = int((time.time() if now is None else now) * 1000)
    return f"{ms:012x}{secrets.token_hex(6)}"


def feedback_dataset(program: str) -> str:
    """The name of a program's feedback dataset (what ``include_feedback`` appends: ``dataset:<name>``)."""
    return DatasetRef.parse(feedback_reference(program)).name


def prediction_key(program: str, prediction_id: str) -> str:
    return f"{program}.{prediction_id}"


def check_corrections(record: RecordedPrediction, outputs: Mapping[str, Any], where: str = "outputs") -> None:
    """Every corrected field must be an output field of the prediction; the error names the unknown ones and the
    valid ones."""
    unknown = [k for k in outputs if k not in record.outputs]
    if not unknown:
        return
    valid = ", ".join(sorted(record.outputs)) or "(none)"
    names = ", ".join(repr(clip(k, 64)) for k in unknown[:_LISTED])
    message = (
        f"prediction {record.prediction_id} of {record.program}: {names} "
        f"{'is not an output field' if len(unknown) == 1 else 'are not output fields'}; its output fields are: {valid}"
    )
    raise MessageValidationError(
        message, [FieldError(loc=f"{where}.{clip(k, 64)}", message=f"not an output field ({valid})") for k in unknown]
    )


def feedback_row(record: RecordedPrediction, corrections: Mapping[str, Any]) -> dict[str, Any]:
    """A labelled example: the prediction's inputs, and its outputs with the corrected fields overridden."""
    return {**record.inputs, **record.outputs, **corrections}


def agrees(record: RecordedPrediction, corrections: Mapping[str, Any]) -> bool:
    """Whether every corrected value is what the program had answered."""
    return all(record.outputs.get(k) == v for k, v in corrections.items())


def _canonical(values: Mapping[str, Any]) -> str:
    return json.dumps(values, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def merge_rows(
    base: Sequence[Mapping[str, Any]], new: Sequence[tuple[Mapping[str, Any], Mapping[str, Any]]]
) -> list[dict[str, Any]]:
    """``base`` with the ``(inputs, row)`` pairs of ``new``: a row of the same inputs (same input fields, same
    values) is replaced where it stands, by the last pair that has them; the other pairs follow, in order. The same
    batch again gives the same rows in the same order (so the same dataset version)."""
    latest: dict[tuple[frozenset[str], str], dict[str, Any]] = {}
    for inputs, row in new:
        latest[(frozenset(inputs), _canonical(inputs))] = dict(row)
    field_sets = {fields for fields, _ in latest}

    def key_of(row: Mapping[str, Any]) -> tuple[frozenset[str], str] | None:
        for fields in field_sets:
            if fields <= row.keys():
                key = (fields, _canonical({f: row[f] for f in fields}))
                if key in latest:
                    return key
        return None

    merged: list[dict[str, Any]] = []
    placed: set[tuple[frozenset[str], str]] = set()
    for row in base:
        key = key_of(row)
        if key is None:
            merged.append(dict(row))
        elif key not in placed:
            merged.append(latest[key])
            placed.add(key)
    return merged + [row for key, row in latest.items() if key not in placed]


class FeedbackHead(Message):
    """``head.<program>``: the feedback dataset version the last batch wrote."""

    program: str
    version: str
    rows: int
    updated_at: float


def _parse_head(raw: bytes | None) -> FeedbackHead | None:
    """The stored head; ``None`` when there is none, or it is unreadable (the next batch replaces it)."""
    if not raw:
        return None
    try:
        return FeedbackHead.model_validate_json(raw)
    except ValidationError:
        return None


@dataclass
class RecordingCounts:
    recorded: int = 0
    failed: int = 0
    too_large: int = 0


@dataclass(frozen=True)
class _Correction:
    record: RecordedPrediction
    corrections: dict[str, Any]
    agreed: bool

    @property
    def repeated(self) -> bool:
        """The prediction already has exactly these corrections (a batch sent again): nothing new to count."""
        return self.record.corrections == self.corrections


class FeedbackStore:
    """Recording settings, recorded predictions and the feedback datasets of every program."""

    def __init__(
        self, bus: Bus, records: KeyValue, records_bucket: str, state: KeyValue, datasets: DatasetStore
    ) -> None:
        self.bus = bus
        self.records = records
        self.records_bucket = records_bucket
        self.state = state
        self.datasets = datasets
        self.counts = RecordingCounts()
        self.conflicts = 0  # feedback batches that lost the head's compare-and-swap and were built again
        self._rates: dict[str, tuple[float, float]] = {}  # program -> (sample rate, monotonic time read)
        self._locks: dict[str, anyio.Lock] = {}

    @classmethod
    async def open(cls, bus: Bus, layout: StreamLayout | None = None) -> FeedbackStore:
        records_bucket = bus.subjects.bucket(PREDICTIONS_BUCKET)
        records = await cache_bucket(bus, records_bucket, layout, ttl=RETENTION, max_bytes=MAX_BYTES)
        state = await key_value(bus, bus.subjects.bucket(FEEDBACK_BUCKET), layout)
        return cls(bus, records, records_bucket, state, await DatasetStore.open(bus, layout))

    # --- settings ------------------------------------------------------------------------------------

    async def settings(self, program: str) -> RecordSettings:
        raw = await self._get(self.state, f"settings.{program}")
        settings = RecordSettings.model_validate_json(raw) if raw else RecordSettings(program=program)
        self._rates[program] = (settings.sample_rate, time.monotonic())
        return settings

    async def set_sample_rate(self, program: str, rate: float) -> RecordSettings:
        settings = RecordSettings(program=program, sample_rate=rate, updated_at=time.time())
        await self.state.put(f"settings.{program}", settings.model_dump_json().encode())
        self._rates[program] = (rate, time.monotonic())
        return settings

    async def sample_rate(self, program: str) -> float:
        """The program's sample rate, read at most every ``SETTINGS_TTL`` seconds; never raises (a failed read
        keeps the last known rate, or off)."""
        known = self._rates.get(program)
        if known is not None and time.monotonic() - known[1] < SETTINGS_TTL:
            return known[0]
        try:
            with anyio.fail_after(RECORD_TIMEOUT):
                return (await self.settings(program)).sample_rate
        except Exception as exc:  # recording must never fail a prediction
            log.warning("sample rate of %s not read: %s", program, exc)
            return known[0] if known is not None else 0.0

    # --- records -------------------------------------------------------------------------------------

    async def record(self, prediction: RecordedPrediction) -> bool:
        """Store one sampled prediction; never raises (a failure is logged and counted)."""
        data = prediction.model_dump_json().encode()
        if len(data) > self.bus.max_payload - 1024:
            self.counts.too_large += 1
            log.warning("prediction %s of %s not recorded: %d bytes, over the message limit",
                        prediction.prediction_id, prediction.program, len(data))  # fmt: skip
            return False
        try:
            with anyio.fail_after(RECORD_TIMEOUT):
                await self.records.put(prediction_key(prediction.program, prediction.prediction_id), data)
        except Exception as exc:
            self.counts.failed += 1
            log.warning("prediction %s of %s not recorded: %r", prediction.prediction_id, prediction.program, exc)
            return False
        self.counts.recorded += 1
        return True

    async def find(self, prediction_id: str, program: str | None = None) -> RecordedPrediction | None:
        """A recorded prediction by id (and program, when known: one read; else one listing first)."""
        if program is not None:
            raw = await self._get(self.records, prediction_key(program, prediction_id))
            if raw:
                return RecordedPrediction.model_validate_json(raw)
        keys = await kv_keys_matching(self.bus.js, self.records_bucket, f"*.{prediction_id}")
        for key in keys:
            raw = await self._get(self.records, key)
            if raw:
                return RecordedPrediction.model_validate_json(raw)
        return None

    async def newest(self, program: str, limit: int, max_bytes: int) -> tuple[list[RecordedPrediction], bool]:
        """The program's newest ``limit`` records, newest first, as many as fit in ``max_bytes`` of JSON; and
        whether some were left out for size."""
        keys = await kv_keys_matching(self.bus.js, self.records_bucket, f"{program}.*")
        found: list[RecordedPrediction] = []
        size = 0
        for key in reversed(keys):
            if len(found) >= limit:
                break
            raw = await self._get(self.records, key)
            if not raw:
                continue  # expired or deleted since the listing
            size += len(raw) + 1
            if size > max_bytes:
                return found, True
            found.append(RecordedPrediction.model_validate_json(raw))
        return found, False

    async def _mark(self, correction: _Correction) -> None:
        record = correction.record
        corrected_at = time.time()

        def change(current: bytes | None) -> bytes | None:
            if not current:
                return None  # expired meanwhile: the dataset has the row, there is nothing to mark
            stored = RecordedPrediction.model_validate_json(current)
            marked = stored.model_copy(
                update={"corrections": correction.corrections, "corrected_at": corrected_at,
                        "agreed": correction.agreed}
            )  # fmt: skip
            return marked.model_dump_json().encode()

        await kv_update(self.records, prediction_key(record.program, record.prediction_id), change)

    # --- feedback ------------------------------------------------------------------------------------

    async def apply(self, request: FeedbackRequest) -> FeedbackReply:
        """Check a batch (every prediction exists and belongs to one program; every corrected field is an
        output field), store the new version of the program's feedback dataset, mark the predictions."""
        corrections = await self._corrections(request)
        program = corrections[0].record.program
        pairs: list[tuple[dict[str, Any], dict[str, Any]]] = []
        for i, c in enumerate(corrections):
            row = feedback_row(c.record, c.corrections)
            try:
                canonical_row(row, i + 1)
            except RowError as exc:
                raise MessageValidationError(
                    f"the correction of prediction {c.record.prediction_id} cannot be a dataset row: {exc.message}",
                    [FieldError(loc=f"items.{i}", message=exc.message, type="invalid_row")],
                ) from exc
            pairs.append((c.record.inputs, row))
        manifest = await self._store(program, pairs)
        new = [c for c in corrections if not c.repeated]
        for c in new:
            await self._mark(c)
        tallies: dict[int, FeedbackTally] = {}
        for c in new:
            tally = tallies.setdefault(c.record.version, FeedbackTally(version=c.record.version, count=0, agreed=0))
            tally.count += 1
            tally.agreed += int(c.agreed)
        return FeedbackReply(
            program=program,
            dataset=manifest.ref.label,
            rows=manifest.rows,
            count=len(new),
            agreed=sum(int(c.agreed) for c in new),
            repeated=len(corrections) - len(new),
            versions=[tallies[v] for v in sorted(tallies)],
        )

    async def _corrections(self, request: FeedbackRequest) -> list[_Correction]:
        program = request.program
        found: list[tuple[int, FeedbackItem, RecordedPrediction]] = []
        missing: list[str] = []
        for i, item in enumerate(request.items):
            record = await self.find(item.prediction_id, program)
            if record is None:
                missing.append(item.prediction_id)
                continue
            if program is None:
                program = record.program  # the first one names the batch's program: the rest are one read each
            elif record.program != program:
                raise MessageValidationError(
                    f"prediction {item.prediction_id} is of program {record.program}, not {program}: "
                    "send each program's feedback in its own batch",
                    [FieldError(loc=f"items.{i}.prediction_id", message=f"a prediction of {record.program}")],
                )
            found.append((i, item, record))
        if missing:
            listed = ", ".join(missing[:_LISTED]) + (f" (and {len(missing) - _LISTED} more)" if len(missing) > _LISTED
                                                      else "")  # fmt: skip
            raise NotFoundError(
                f"no recorded prediction {listed}: is recording on for the program ('dspyrt predictions PROGRAM "
                f"--record RATE'), and was it made in the last {RETENTION / 86400:g} days?"
            )
        out = []
        for i, item, record in found:
            check_corrections(record, item.outputs, where=f"items.{i}.outputs")
            out.append(_Correction(record, dict(item.outputs), agrees(record, item.outputs)))
        return out

    async def _store(
        self, program: str, pairs: Sequence[tuple[Mapping[str, Any], Mapping[str, Any]]]
    ) -> DatasetManifest:
        """Put the next version of the feedback dataset: one batch at a time per process (a lock), and across
        replicas through the head's compare-and-swap (the loser reads the winner's version and tries again)."""
        made: list[DatasetManifest] = []  # one per attempt: the last is the version the head names

        async def build(raw: bytes | None) -> bytes:
            if made:
                self.conflicts += 1  # another replica's batch got there first: build on its version
            base = await self._base_rows(program, _parse_head(raw))
            manifest = await self.datasets.put(
                feedback_dataset(program), merge_rows(base, pairs), source=FEEDBACK_SOURCE
            )
            made.append(manifest)
            head = FeedbackHead(program=program, version=manifest.version, rows=manifest.rows, updated_at=time.time())
            return head.model_dump_json().encode()

        async with self._locks.setdefault(program, anyio.Lock()):
            await kv_update(self.state, f"head.{program}", build, attempts=_ATTEMPTS)
        return made[-1]

    async def _base_rows(self, program: str, head: FeedbackHead | None) -> list[dict[str, Any]]:
        """What the next version builds on: the newest version if a person put it (``datasets put``: a curated
        set is kept), else the version the last batch wrote (the newest may be a losing batch's, about to be
        replaced); nothing if neither exists."""
        name = feedback_dataset(program)
        raw = await self._get(self.datasets.index, name)
        newest = DatasetIndex.model_validate_json(raw).latest if raw else None
        candidates: list[str] = []
        if newest is not None and newest.source != FEEDBACK_SOURCE:
            candidates.append(newest.version)
        if head is not None:
            candidates.append(head.version)
        if newest is not None:
            candidates.append(newest.version)
        for version in candidates:
            try:
                return await self.datasets.rows(DatasetRef(name, version))
            except DatasetNotFoundError:  # removed by hand
                continue
        return []

    @staticmethod
    async def _get(kv: KeyValue, key: str) -> bytes | None:
        try:
            entry = await kv.get(key)
        except (KeyNotFoundError, KeyDeletedError):
            return None
        return entry.value or None

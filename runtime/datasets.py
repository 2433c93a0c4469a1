"""Datasets: versioned, content-addressed example sets in the JetStream object store.

A dataset version is a list of rows (JSON objects whose keys are field names). Its version is a short hash of its
content, so putting the same rows again gives the same version and stores nothing new. A task names data either
inline (a list of rows, for small data) or by reference: ``"dataset:NAME"`` (the newest version, pinned at submit)
or ``"dataset:NAME@VERSION"``; a list of references is their rows one after the other.

Storage (object store ``<PREFIX>_datasets``): ``NAME/VERSION/part-NNNNNN.jsonl`` objects of at most
``PART_ROWS`` rows and about ``PART_BYTES`` bytes each, and ``NAME/VERSION/manifest.json`` (rows, fields, the
parts with their offsets and sha256), written last, so a version whose manifest exists is complete. A reader of
rows ``[start, stop)`` fetches only the parts that hold them: memory per reader does not grow with the dataset.
The KV bucket ``<PREFIX>_datasets`` keeps one index per name (its versions, newest last), updated with
compare-and-swap.

Nothing about DSPy here: rows are plain JSON.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

from nats.js.errors import KeyNotFoundError, ObjectNotFoundError
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore
from pydantic import BaseModel, BeforeValidator, Field

from dspyrt.bus import (
    Bus,
    DspyrtError,
    Message,
    MessageValidationError,
    NotFoundError,
    PayloadTooLargeError,
    StreamLayout,
)
from dspyrt.bus.errors import FieldError
from dspyrt.bus.streams import key_value, kv_keys, kv_update, object_store, put_object

STORE = "datasets"
FORMAT = "dspyrt.dataset/1"
NAME = re.compile(r"^[A-Za-z0-9_-]{1,80}$")
VERSION = re.compile(r"^[0-9a-f]{12}$")
REFERENCE = re.compile(r"^dataset:([A-Za-z0-9_-]{1,80})(?:@([0-9a-f]{12}))?$")
FIELD_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")

PART_ROWS = 1000
PART_BYTES = 1024 * 1024
# One row must fit in a message beside its task's other fields (an inline shard, a recorded prediction).
MAX_ROW_BYTES = 256 * 1024
MAX_ROWS = 10_000_000
# Rows a task may carry inline (beyond this, or beyond the message size limit, use a dataset).
MAX_INLINE_ROWS = 100_000
# Rows listed in one error: a file with a systematic mistake should not produce a megabyte of errors.
MAX_ROW_ERRORS = 20


# ------------------------------------------------------------------------------------------ references


@dataclass(frozen=True)
class DatasetRef:
    """``dataset:NAME`` or ``dataset:NAME@VERSION``."""

    name: str
    version: str | None = None

    @classmethod
    def parse(cls, text: str) -> DatasetRef:
        match = REFERENCE.match(text.strip())
        if match is None:
            raise MessageValidationError(
                f"{text[:100]!r} is not a dataset reference: write 'dataset:NAME' or 'dataset:NAME@VERSION' "
                "(NAME: letters, digits, '_' or '-'; VERSION: the 12 hex digits 'dspyrt datasets put' printed)"
            )
        return cls(match.group(1), match.group(2))

    @property
    def pinned(self) -> bool:
        return self.version is not None

    def __str__(self) -> str:
        return f"dataset:{self.name}" + (f"@{self.version}" if self.version else "")

    @property
    def label(self) -> str:
        """``NAME@VERSION`` (what ``datasets put`` prints)."""
        return f"{self.name}@{self.version}" if self.version else self.name


def is_reference(value: Any) -> bool:
    return isinstance(value, str) and value.startswith("dataset:")


def check_examples(value: Any) -> Any:
    """The pydantic check of a field that takes examples: a non-empty list of rows, a reference, or a
    non-empty list of references. Rows themselves are checked where they are used (against the program)."""
    if isinstance(value, str):
        _check_reference(value)
        return value
    if isinstance(value, list):
        if not value:
            raise ValueError("no examples: give at least one row, or a dataset reference 'dataset:NAME'")
        if all(isinstance(item, str) for item in value):
            for item in value:
                _check_reference(item)
            return value
        if len(value) > MAX_INLINE_ROWS:
            raise ValueError(f"{len(value)} inline examples, over {MAX_INLINE_ROWS}: {TOO_LARGE_HINT}")
        for i, row in enumerate(value):
            if not isinstance(row, dict):
                raise ValueError(f"example {i} is not a JSON object (rows and references cannot be mixed)")
            if not row:
                raise ValueError(f"example {i} is empty")
        return value
    raise ValueError("examples are a list of rows or a dataset reference 'dataset:NAME[@VERSION]'")


Examples = Annotated[list[dict[str, Any]] | list[str] | str, BeforeValidator(check_examples)]
"""The type of a task field that takes examples: rows inline, ``"dataset:NAME[@VERSION]"``, or a list of those
references (their rows one after the other)."""


def _check_reference(text: str) -> None:
    try:
        DatasetRef.parse(text)
    except MessageValidationError as exc:  # pydantic turns ValueErrors into field errors
        raise ValueError(exc.message) from None


def references_in(value: Any) -> list[DatasetRef]:
    """The dataset references an examples field holds (none for inline rows)."""
    if isinstance(value, str) and is_reference(value):
        return [DatasetRef.parse(value)]
    if isinstance(value, list) and value and all(is_reference(v) for v in value):
        return [DatasetRef.parse(v) for v in value]
    return []


# ------------------------------------------------------------------------------------------------ rows


def canonical_row(row: Any, number: int) -> str:
    """One row as canonical JSON (sorted keys, no spaces), checked; ``number`` is 1-based, for the error."""
    return _checked_row(row, number)[0]


def _checked_row(row: Any, number: int) -> tuple[str, Mapping[str, Any]]:
    """The row as canonical JSON, and as the mapping it was checked as."""
    if hasattr(row, "toDict") and callable(row.toDict):  # a dspy.Example (no DSPy import here)
        row = row.toDict()
    if not isinstance(row, Mapping):
        raise RowError(number, None, f"is not a JSON object but {type(row).__name__}")
    if not row:
        raise RowError(number, None, "is empty")
    for key in row:
        if not isinstance(key, str) or not FIELD_NAME.match(key):
            raise RowError(number, str(key), "is not a field name (letters, digits and '_', not starting with a digit)")
    try:
        text = json.dumps(row, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        bad = next((k for k, v in row.items() if not _jsonable(v)), None)
        raise RowError(number, bad, f"holds a value that is not JSON ({exc})") from exc
    if len(text.encode()) > MAX_ROW_BYTES:
        raise RowError(number, None, f"is {len(text.encode())} bytes, over the limit of {MAX_ROW_BYTES} per row")
    return text, row


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return True


class RowError(MessageValidationError):
    """A row that cannot be stored: its 1-based number and the field, if one is at fault."""

    def __init__(self, number: int, field: str | None, problem: str) -> None:
        where = f"row {number}" + (f", field {field!r}" if field is not None else "")
        super().__init__(f"{where} {problem}", [FieldError(loc=where, message=problem, type="invalid_row")])
        self.number = number
        self.field = field


def canonical_rows(rows: Iterable[Any]) -> tuple[list[str], set[str]]:
    """Every row as canonical JSON, and every field name some row has; a :class:`MessageValidationError` lists the
    bad rows (up to ``MAX_ROW_ERRORS``), each with its 1-based number and field."""
    lines: list[str] = []
    fields: set[str] = set()
    errors: list[RowError] = []
    for number, row in enumerate(rows, start=1):
        try:
            text, checked = _checked_row(row, number)
        except RowError as exc:
            errors.append(exc)
            if len(errors) >= MAX_ROW_ERRORS:
                break
        else:
            lines.append(text)
            fields.update(checked)
        if number > MAX_ROWS:
            raise MessageValidationError(f"more than {MAX_ROWS} rows: split the dataset")
    if errors:
        more = " (and maybe more)" if len(errors) >= MAX_ROW_ERRORS else ""
        raise MessageValidationError(
            f"{len(errors)} bad row(s){more}: " + "; ".join(e.message for e in errors[:3]),
            [f for e in errors for f in e.field_errors],
        )
    if not lines:
        raise MessageValidationError("a dataset needs at least one row")
    return lines, fields


def content_version(lines: list[str]) -> str:
    digest = hashlib.sha256()
    for line in lines:
        digest.update(line.encode())
        digest.update(b"\n")
    return digest.hexdigest()[:12]


# ------------------------------------------------------------------------------------------ documents


class DatasetPart(Message):
    name: str  # object name
    offset: int = Field(ge=0)  # index of its first row in the dataset
    rows: int = Field(ge=1)
    bytes: int = Field(ge=0)
    sha256: str


class DatasetManifest(Message):
    """One stored version: what ``show`` prints and what readers use to find rows."""

    format: str = FORMAT
    name: str
    version: str
    rows: int
    bytes: int
    fields: list[str]  # every field name some row has, sorted
    parts: list[DatasetPart]
    created_at: float = Field(default_factory=time.time)
    source: str | None = None  # the file it was read from, if any

    @property
    def ref(self) -> DatasetRef:
        return DatasetRef(self.name, self.version)


class DatasetVersion(Message):
    version: str
    rows: int
    bytes: int
    fields: list[str]
    created_at: float
    source: str | None = None


class DatasetIndex(Message):
    """The versions of one name, oldest first (the last is what ``dataset:NAME`` means)."""

    name: str
    versions: list[DatasetVersion] = Field(default_factory=list)

    @property
    def latest(self) -> DatasetVersion | None:
        return self.versions[-1] if self.versions else None


def _prefix(ref: DatasetRef) -> str:
    return f"{ref.name}/{ref.version}/"


def part_name(ref: DatasetRef, number: int) -> str:
    return f"{_prefix(ref)}part-{number:06d}.jsonl"


def manifest_name(ref: DatasetRef) -> str:
    return f"{_prefix(ref)}manifest.json"


# ---------------------------------------------------------------------------------------------- store


class DatasetNotFoundError(NotFoundError):
    code = "dataset_not_found"


class DatasetStore:
    """Put, find and read dataset versions. Readers keep the last few parts they fetched (``cached_parts``)."""

    def __init__(
        self, objects: ObjectStore, index: KeyValue, name: str, *, max_payload: int, cached_parts: int = 4
    ) -> None:
        self.objects = objects
        self.max_payload = max_payload
        self.index = index
        self.name = name
        self._parts: dict[str, list[dict[str, Any]]] = {}
        self._cached_parts = cached_parts
        self._manifests: dict[DatasetRef, DatasetManifest] = {}

    @classmethod
    async def open(cls, bus: Bus, layout: StreamLayout | None = None) -> DatasetStore:
        name = bus.subjects.object_store(STORE)
        objects = await object_store(bus, name, layout)
        index = await key_value(bus, bus.subjects.bucket(STORE), layout)
        return cls(objects, index, name, max_payload=bus.max_payload)

    # --- writing

    async def put(self, name: str, rows: Iterable[Any], *, source: str | None = None) -> DatasetManifest:
        """Store ``rows`` as a version of ``name`` (checked first: nothing is stored if a row is bad). The same
        content again is the same version: nothing new is written, and it becomes the newest again only if it
        was not already."""
        if not NAME.match(name):
            raise MessageValidationError(f"dataset name {name[:80]!r}: use 1-80 letters, digits, '_' or '-'")
        lines, fields = canonical_rows(rows)
        ref = DatasetRef(name, content_version(lines))
        try:
            manifest = await self.manifest(ref)
        except DatasetNotFoundError:
            manifest = await self._write(ref, lines, fields, source)
        await self._add_to_index(manifest)
        return manifest

    async def _write(
        self, ref: DatasetRef, lines: list[str], fields: set[str], source: str | None
    ) -> DatasetManifest:
        parts: list[DatasetPart] = []
        total = 0
        chunk: list[str] = []
        chunk_bytes = 0
        offset = 0

        async def flush() -> None:
            nonlocal chunk, chunk_bytes, offset
            data = ("\n".join(chunk) + "\n").encode()
            object_name = part_name(ref, len(parts))
            await put_object(self.objects, object_name, data, self.max_payload)
            parts.append(DatasetPart(name=object_name, offset=offset, rows=len(chunk), bytes=len(data),
                                     sha256=hashlib.sha256(data).hexdigest()))  # fmt: skip
            offset += len(chunk)
            chunk, chunk_bytes = [], 0

        for line in lines:
            size = len(line.encode()) + 1
            if chunk and (len(chunk) >= PART_ROWS or chunk_bytes + size > PART_BYTES):
                await flush()
            chunk.append(line)
            chunk_bytes += size
            total += size
        if chunk:
            await flush()
        manifest = DatasetManifest(
            name=ref.name, version=ref.version or "", rows=len(lines), bytes=total, fields=sorted(fields),
            parts=parts, source=source,
        )  # fmt: skip
        # Written last: a version whose manifest exists is complete.
        await put_object(self.objects, manifest_name(ref), manifest.model_dump_json().encode(), self.max_payload)
        return manifest

    async def _add_to_index(self, manifest: DatasetManifest) -> None:
        entry = DatasetVersion(
            version=manifest.version, rows=manifest.rows, bytes=manifest.bytes, fields=manifest.fields,
            created_at=manifest.created_at, source=manifest.source,
        )  # fmt: skip

        def add(current: bytes | None) -> bytes | None:
            index = DatasetIndex.model_validate_json(current) if current else DatasetIndex(name=manifest.name)
            if index.latest is not None and index.latest.version == manifest.version:
                return None
            index.versions = [v for v in index.versions if v.version != manifest.version] + [entry]
            return index.model_dump_json().encode()

        await kv_update(self.index, manifest.name, add)

    async def remove(self, ref: DatasetRef) -> DatasetManifest:
        """Delete one version (its parts, then its manifest, then its index entry)."""
        if not ref.pinned:
            raise MessageValidationError(f"say which version to remove: {ref.name}@VERSION (see 'datasets list')")
        manifest = await self.manifest(ref)

        def drop(current: bytes | None) -> bytes | None:
            if not current:
                return None
            index = DatasetIndex.model_validate_json(current)
            index.versions = [v for v in index.versions if v.version != ref.version]
            return index.model_dump_json().encode()

        await kv_update(self.index, ref.name, drop)
        await self.objects.delete(manifest_name(ref))
        for part in manifest.parts:
            try:
                await self.objects.delete(part.name)
            except ObjectNotFoundError:
                pass
        self._manifests.pop(ref, None)
        return manifest

    # --- finding

    async def indexes(self) -> list[DatasetIndex]:
        """Every dataset name with its versions, by name."""
        found = []
        for key in sorted(await kv_keys(self.index)):
            try:
                entry = await self.index.get(key)
            except KeyNotFoundError:
                continue
            if entry.value:
                index = DatasetIndex.model_validate_json(entry.value)
                if index.versions:
                    found.append(index)
        return found

    async def resolve(self, ref: DatasetRef | str) -> DatasetRef:
        """The pinned reference: ``dataset:NAME`` becomes its newest version; a pinned one is checked."""
        ref = DatasetRef.parse(ref) if isinstance(ref, str) else ref
        if ref.pinned:
            await self.manifest(ref)
            return ref
        try:
            entry = await self.index.get(ref.name)
        except KeyNotFoundError:
            entry = None
        index = DatasetIndex.model_validate_json(entry.value) if entry is not None and entry.value else None
        if index is None or index.latest is None:
            raise DatasetNotFoundError(
                f"no dataset {ref.name!r}: store it first with 'dspyrt datasets put {ref.name} FILE'"
            )
        return DatasetRef(ref.name, index.latest.version)

    async def manifest(self, ref: DatasetRef | str) -> DatasetManifest:
        ref = DatasetRef.parse(ref) if isinstance(ref, str) else ref
        if not ref.pinned:
            ref = await self.resolve(ref)
        cached = self._manifests.get(ref)
        if cached is not None:
            return cached
        try:
            result = await self.objects.get(manifest_name(ref))
        except ObjectNotFoundError as exc:
            raise DatasetNotFoundError(f"no dataset version {ref.label} (see 'dspyrt datasets list')") from exc
        manifest = DatasetManifest.model_validate_json(result.data or b"{}")
        self._manifests[ref] = manifest
        return manifest

    # --- reading

    async def rows(self, ref: DatasetRef | str, start: int = 0, stop: int | None = None) -> list[dict[str, Any]]:
        """Rows ``[start, stop)`` of a version, reading only the parts that hold them."""
        manifest = await self.manifest(ref)
        stop = manifest.rows if stop is None else min(stop, manifest.rows)
        out: list[dict[str, Any]] = []
        for part in manifest.parts:
            if part.offset + part.rows <= start or part.offset >= stop:
                continue
            rows = await self._part(part)
            out.extend(rows[max(start - part.offset, 0) : stop - part.offset])
        return out

    async def _part(self, part: DatasetPart) -> list[dict[str, Any]]:
        cached = self._parts.get(part.name)
        if cached is not None:
            return cached
        try:
            result = await self.objects.get(part.name)
        except ObjectNotFoundError as exc:
            raise DatasetNotFoundError(f"dataset part {part.name} is missing (the version was removed?)") from exc
        data = result.data or b""
        if hashlib.sha256(data).hexdigest() != part.sha256:
            raise DspyrtError(f"dataset part {part.name} does not match its sha256", code="corrupt_dataset")
        rows = [json.loads(line) for line in data.decode().splitlines() if line]
        if len(self._parts) >= self._cached_parts:
            self._parts.pop(next(iter(self._parts)))
        self._parts[part.name] = rows
        return rows

    async def examples(self, value: Any) -> tuple[list[dict[str, Any]], list[DatasetRef]]:
        """The rows an examples field means (inline rows as they are), and the pinned references they came from."""
        refs = references_in(value)
        if not refs:
            return list(value), []
        rows: list[dict[str, Any]] = []
        pinned = []
        for ref in refs:
            ref = await self.resolve(ref)
            pinned.append(ref)
            rows.extend(await self.rows(ref))
        return rows, pinned

    async def pin(self, value: Any) -> Any:
        """An examples field with every reference pinned (inline rows unchanged); a missing dataset is a
        :class:`DatasetNotFoundError`."""
        refs = references_in(value)
        if not refs:
            return value
        pinned = [str(await self.resolve(ref)) for ref in refs]
        return pinned[0] if isinstance(value, str) else pinned


async def pin_references(store: DatasetStore, payload: dict[str, Any]) -> dict[str, Any]:
    """A task input whose top-level dataset references are pinned to versions: the task then runs on the data that
    existed when it was submitted, on every delivery and in every phase. A missing dataset fails here, at submit."""
    out = dict(payload)
    for key, value in payload.items():
        if references_in(value):
            out[key] = await store.pin(value)
    return out


def has_references(payload: dict[str, Any]) -> bool:
    return any(references_in(value) for value in payload.values())


TOO_LARGE_HINT = (
    "put the examples in a dataset ('dspyrt datasets put NAME FILE', or await client.put_dataset(NAME, rows)) "
    'and pass "dataset:NAME" where the rows were'
)


def with_dataset_hint(exc: PayloadTooLargeError) -> PayloadTooLargeError:
    """The same error, saying what to do about a task input that is too large to send."""
    hinted = PayloadTooLargeError(exc.size, exc.limit)
    hinted.message = f"{exc.message}: {TOO_LARGE_HINT}"
    return hinted


M = TypeVar("M", bound=BaseModel)


async def pin_fields(store: DatasetStore, request: M, fields: Iterable[str]) -> M:
    """``request`` with the references in ``fields`` pinned to versions."""
    update = {f: await store.pin(getattr(request, f)) for f in fields if references_in(getattr(request, f))}
    return request.model_copy(update=update) if update else request


async def load_fields(store: DatasetStore, request: M, fields: Iterable[str]) -> tuple[M, dict[str, list[str]]]:
    """``request`` with the rows of the references in ``fields`` in their place, and which versions each field
    used (``{"trainset": ["qa@1a2b3c4d5e6f"]}``; inline fields are not listed)."""
    update: dict[str, Any] = {}
    used: dict[str, list[str]] = {}
    for name in fields:
        value = getattr(request, name)
        if references_in(value):
            update[name], refs = await store.examples(value)
            used[name] = [ref.label for ref in refs]
    return (request.model_copy(update=update) if update else request), used

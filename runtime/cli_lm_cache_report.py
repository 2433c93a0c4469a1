"""What ``dspyrt lm-cache`` reads and does (``dspyrt.runtime.cli_lm_cache`` is the command): the LM cache bucket's facts
from its stream, ``--clear``'s audited purge, and the human view of both.

Imported by the command when it runs, so that ``dspyrt`` starts without pydantic models or NATS.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from pydantic import BaseModel, Field
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from dspyrt.runtime.cli_output import duration, size

if TYPE_CHECKING:
    from dspyrt.bus import Bus
    from dspyrt.runtime.config import IntegrationConfig

CLEAR_ACTION = "lm-cache.clear"
NO_CACHE = "no LM cache yet (the switcher creates it on its first start)"
_PERMISSIONS_VIOLATION = "permissions violation"


class LmCacheSettings(BaseModel):
    """The cache's configuration as this process reads it (the switchers read the same file and variables)."""

    lm_cache: bool
    lm_cache_ttl_hours: float
    lm_cache_max_mb: int
    lm_cache_memory_entries: int

    @classmethod
    def of(cls, config: IntegrationConfig) -> LmCacheSettings:
        return cls(
            lm_cache=config.lm_cache,
            lm_cache_ttl_hours=config.lm_cache_ttl_hours,
            lm_cache_max_mb=config.lm_cache_max_mb,
            lm_cache_memory_entries=config.lm_cache_memory_entries,
        )


class LmCacheReport(BaseModel):
    """What ``dspyrt lm-cache`` says (``--json`` prints it as it is)."""

    bucket: str
    stream: str
    exists: bool
    entries: int = 0  # the stream's message count: one per cached reply
    size_bytes: int = 0
    ttl_seconds: float | None = None  # the bucket's own max_age (None: no bucket, or no limit)
    max_bytes: int | None = None  # the bucket's own size limit (None: no bucket, or no limit)
    settings: LmCacheSettings
    removed: int | None = None  # with --clear: the entries the purge removed
    notes: list[str] = Field(default_factory=list)


def memory_note(settings: LmCacheSettings) -> str:
    return (
        f"each running switcher also keeps up to {settings.lm_cache_memory_entries} replies in its in-memory LRU,"
        " emptied only when it restarts"
    )


def _differences(report: LmCacheReport) -> list[str]:
    """The bucket keeps the limits it was created with; say so when the configuration has changed since."""
    notes: list[str] = []
    configured_ttl = report.settings.lm_cache_ttl_hours * 3600
    if report.ttl_seconds is not None and abs(report.ttl_seconds - configured_ttl) > 1:
        notes.append(f"the bucket's TTL is {duration(report.ttl_seconds)}, the configured {duration(configured_ttl)}")
    configured_bytes = report.settings.lm_cache_max_mb * 1024 * 1024
    if report.max_bytes is not None and report.max_bytes != configured_bytes:
        notes.append(f"the bucket's size limit is {size(report.max_bytes)}, the configured {size(configured_bytes)}")
    if notes:
        notes.append("a bucket keeps the limits it was created with: the configured ones apply to a new bucket")
    return notes


@contextmanager
def _jetstream(bus: Bus, what: str) -> Iterator[None]:
    """nats-py's errors as the project's: one line, a stable code. A refused permission is not answered at all
    (the server drops the request and tells the connection), so a timeout is checked against the last error."""
    from nats.errors import Error as NatsError
    from nats.errors import NoRespondersError
    from nats.js.errors import APIError, NoStreamResponseError

    from dspyrt.bus import BusUnavailableError, DspyrtError

    try:
        yield
    except TimeoutError as exc:
        last = bus.nc.last_error
        if last is not None and _PERMISSIONS_VIOLATION in str(last).lower():
            # nats-py lower-cases the server's message (subject included): name the user and the action instead.
            who = f"user {bus.options.user!r}" if bus.options.user else "this connection"
            raise DspyrtError(
                f"NATS refused to {what}: permissions violation for {who}", code="permission_denied"
            ) from exc
        raise DspyrtError(f"no answer from JetStream to {what}", code="timeout") from exc
    except (NoRespondersError, NoStreamResponseError) as exc:
        raise BusUnavailableError(f"no JetStream answered the request to {what} (is it enabled?)") from exc
    except APIError as exc:
        raise DspyrtError(f"JetStream refused to {what}: {exc.description or exc}", code="jetstream") from exc
    except NatsError as exc:
        raise DspyrtError(f"could not {what}: {exc}", code="nats") from exc


async def read_lm_cache(bus: Bus, settings: LmCacheSettings) -> LmCacheReport:
    """The bucket's facts, read from its stream; ``exists=False`` when no switcher has created it yet."""
    from nats.js.client import KV_STREAM_TEMPLATE  # JetStream's own naming of a KV bucket's stream
    from nats.js.errors import NotFoundError as StreamNotFoundError

    bucket = bus.subjects.lm_cache_bucket
    stream = KV_STREAM_TEMPLATE.format(bucket=bucket)
    report = LmCacheReport(bucket=bucket, stream=stream, exists=False, settings=settings)
    with _jetstream(bus, f"read stream {stream}"):
        try:
            info = await bus.js.stream_info(stream)
        except StreamNotFoundError:
            report.notes.append(NO_CACHE)
            return report
    max_age, max_bytes = info.config.max_age, info.config.max_bytes
    report = report.model_copy(
        update={
            "exists": True,
            "entries": info.state.messages,
            "size_bytes": info.state.bytes,
            "ttl_seconds": max_age if max_age else None,  # 0: no limit
            "max_bytes": max_bytes if max_bytes is not None and max_bytes > 0 else None,  # -1: no limit
        }
    )
    report.notes.extend(_differences(report))
    return report


async def clear_lm_cache(bus: Bus, settings: LmCacheSettings, *, identity: str | None = None) -> LmCacheReport:
    """Purge the bucket's stream, audited; the report after it, with ``removed`` (what it held just before)."""
    from dspyrt.bus import DspyrtError
    from dspyrt.bus.audit import record_audit

    before = await read_lm_cache(bus, settings)
    if not before.exists:
        return before.model_copy(update={"removed": 0})
    with _jetstream(bus, f"purge stream {before.stream}"):
        await bus.js.purge_stream(before.stream)
    removed = before.entries
    try:
        with _jetstream(bus, f"record {CLEAR_ACTION} in the audit trail"):
            await record_audit(bus, CLEAR_ACTION, before.bucket, identity=identity, detail={"removed": removed})
    except DspyrtError as exc:
        raise DspyrtError(f"{before.bucket} was cleared ({removed} entries), but {exc.message}", code=exc.code) from exc
    after = await read_lm_cache(bus, settings)
    return after.model_copy(update={"removed": removed, "notes": [*after.notes, memory_note(settings)]})


def render_report(report: LmCacheReport) -> RenderableType:
    """The human view: the bucket, its facts, the configuration and any notes."""
    parts: list[RenderableType] = []
    if report.removed is not None:
        parts.append(Text(f"removed {report.removed} entries from LM cache bucket {report.bucket}"))
    parts.append(Text.assemble("LM response cache: bucket ", (report.bucket, "bold"), f" (stream {report.stream})"))
    if report.exists:
        facts = Table.grid(padding=(0, 2))
        facts.add_row("  entries", str(report.entries))
        limit = f" of {size(report.max_bytes)}" if report.max_bytes is not None else " (no size limit)"
        facts.add_row("  size", f"{size(report.size_bytes)}{limit}")
        facts.add_row("  ttl", duration(report.ttl_seconds) if report.ttl_seconds is not None else "none")
        parts.append(facts)
    else:
        parts.append(Text(f"  {NO_CACHE}", style="yellow"))
    parts.append(Text("configuration"))
    s = report.settings
    config = Table.grid(padding=(0, 2))
    config.add_row("  lm_cache", "on" if s.lm_cache else "off (switchers started with it use no cache)")
    config.add_row("  lm_cache_ttl_hours", f"{s.lm_cache_ttl_hours:g}")
    config.add_row("  lm_cache_max_mb", str(s.lm_cache_max_mb))
    config.add_row("  lm_cache_memory_entries", str(s.lm_cache_memory_entries))
    parts.append(config)
    parts.extend(Text(f"note: {note}", style="yellow") for note in report.notes if note != NO_CACHE)
    return Group(*parts)

"""Datasets in the object store (versions, parts, references, pinning) and claim-checked task results, on a real
nats-server."""

from __future__ import annotations

import json

import pytest

from dspyrt.bus import Bus, DspyrtError, Message, MessageValidationError, PayloadTooLargeError, TaskStatus
from dspyrt.bus.claims import ClaimStore
from dspyrt.runtime.agent import Agent, TaskContext, task
from dspyrt.runtime.client import Client
from dspyrt.runtime.datasets import (
    PART_ROWS,
    DatasetNotFoundError,
    DatasetRef,
    DatasetStore,
    check_examples,
    pin_references,
)
from tests.helpers import serving

pytestmark = pytest.mark.timeout(60)


def rows(n: int, start: int = 0) -> list[dict[str, str]]:
    return [{"text": f"example number {i}", "label": "even" if i % 2 == 0 else "odd"} for i in range(start, start + n)]


async def test_same_content_same_version_and_ranges_read_only_their_parts(bus: Bus) -> None:
    store = await DatasetStore.open(bus)
    first = await store.put("numbers", rows(2500))
    again = await store.put("numbers", rows(2500))
    assert first.version == again.version and len(first.version) == 12
    assert [p.rows for p in first.parts] == [PART_ROWS, PART_ROWS, 500]
    assert first.fields == ["label", "text"]

    reader = await DatasetStore.open(bus)
    assert await reader.rows(first.ref, 999, 1002) == rows(3, 999)
    # Only the two parts that hold rows 999-1001 were fetched.
    assert sorted(reader._parts) == [first.parts[0].name, first.parts[1].name]
    assert len(await reader.rows("dataset:numbers")) == 2500

    changed = await store.put("numbers", rows(10))
    assert changed.version != first.version
    assert await store.resolve("dataset:numbers") == DatasetRef("numbers", changed.version)
    [index] = await store.indexes()
    assert [v.version for v in index.versions] == [first.version, changed.version]


async def test_bad_rows_are_named_by_number_and_field(bus: Bus) -> None:
    store = await DatasetStore.open(bus)
    with pytest.raises(MessageValidationError) as caught:
        await store.put("bad", [{"text": "ok"}, {}, {"text": "x", "bad field": 1}, ["not", "a", "row"]])
    message = caught.value.message
    assert "row 2 is empty" in message and "row 3, field 'bad field'" in message and "3 bad row(s)" in message
    assert "row 4" in " ".join(f.loc for f in caught.value.field_errors)
    assert await store.indexes() == []  # nothing stored


async def test_references_pin_at_submit_and_a_missing_dataset_fails_there(bus: Bus) -> None:
    store = await DatasetStore.open(bus)
    manifest = await store.put("qa", rows(3))
    pinned = await pin_references(store, {"trainset": "dataset:qa", "devset": ["dataset:qa"], "types": ["code"]})
    assert pinned == {"trainset": f"dataset:qa@{manifest.version}", "devset": [f"dataset:qa@{manifest.version}"],
                      "types": ["code"]}  # fmt: skip
    with pytest.raises(DatasetNotFoundError, match="dspyrt datasets put nope FILE"):
        await pin_references(store, {"devset": "dataset:nope"})
    with pytest.raises(DatasetNotFoundError):
        await pin_references(store, {"devset": "dataset:qa@0123456789ab"})
    with pytest.raises(ValueError, match="not a dataset reference"):
        check_examples("dataset:qa@latest")


async def test_remove_deletes_the_version(bus: Bus) -> None:
    store = await DatasetStore.open(bus)
    old = await store.put("gone", rows(5))
    new = await store.put("gone", rows(6))
    await store.remove(old.ref)
    with pytest.raises(DatasetNotFoundError):
        await store.rows(old.ref)
    assert await store.resolve("dataset:gone") == new.ref


class BigRequest(Message):
    n: int
    pad: str = ""


class BigResultAgent(Agent):
    name = "big"

    @task("big-result")
    async def big(self, payload: BigRequest, ctx: TaskContext) -> dict[str, object]:
        return {"items": ["x" * 100] * payload.n}


async def test_a_large_result_is_claim_checked_and_read_back_whole(config, bus: Bus, client: Client) -> None:  # type: ignore[no-untyped-def]
    async with serving(config, [BigResultAgent]):
        record = await client.run("big-result", {"n": 20_000}, timeout=30)  # ~2 MB of JSON
        assert record.status is TaskStatus.SUCCEEDED
        assert record.result_ref is not None and record.result_ref.size > 1_000_000
        assert len(record.result["items"]) == 20_000
        stored = await client.store.get(record.id, "big-result")
        assert stored is not None and stored.result is None  # the record holds the reference only
        # A body replaced behind the record's back is refused (sha256), not trusted.
        claims = await ClaimStore.open(bus)
        await claims.store.put(record.result_ref.name, json.dumps({"items": []}).encode())
        with pytest.raises(Exception, match="sha256"):
            await client.task(record.id)


async def test_an_input_too_large_to_send_says_to_use_a_dataset(config, client: Client) -> None:  # type: ignore[no-untyped-def]
    async with serving(config, [BigResultAgent]):
        with pytest.raises(PayloadTooLargeError, match="dspyrt datasets put"):
            await client.submit("big-result", {"n": 1, "pad": "x" * 2_000_000})


async def test_a_part_replaced_behind_the_manifest_is_refused(bus: Bus) -> None:
    store = await DatasetStore.open(bus)
    manifest = await store.put("tampered", rows(10))
    await store.objects.put(manifest.parts[0].name, b'{"text": "poisoned", "label": "odd"}\n')
    reader = await DatasetStore.open(bus)
    with pytest.raises(DspyrtError) as refused:
        await reader.rows(manifest.ref)
    assert refused.value.code == "corrupt_dataset"

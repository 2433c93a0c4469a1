"""The pure pieces: subject names, payload decoding and sizing, the error tree, the public surface."""

from __future__ import annotations

import pytest

import dspyrt.bus as bus_package
from dspyrt.bus import DspyrtError, Message, MessageValidationError, PayloadTooLargeError, Subjects
from dspyrt.bus.messages import (
    HEADER_ALLOWANCE,
    LISTED_ERRORS_LIMIT,
    MAX_FIELD_ERRORS,
    check_size,
    decode,
    encode,
    error_body,
)

pytestmark = pytest.mark.timeout(30)


def test_subject_names() -> None:
    s = Subjects()
    assert s.task("optimize") == "dspy.task.optimize"
    assert s.all_tasks == "dspy.task.>"
    assert s.task_kind("dspy.task.optimize") == "optimize"
    assert s.task_consumer("optimize") == "tasks_optimize"
    assert s.dlq("optimize") == "dspy.dlq.optimize"
    assert s.event("cycle.completed") == "dspy.event.cycle.completed"
    assert s.endpoint("switcher", "select") == "dspy.switcher.select"
    assert s.service_name("switcher") == "dspy-switcher"
    assert s.agent_of_service("dspy-switcher") == "switcher"
    assert s.agent_of_service("other-switcher") is None
    assert (s.task_stream, s.event_stream, s.dlq_stream, s.task_bucket) == (
        "DSPY_TASKS",
        "DSPY_EVENTS",
        "DSPY_DLQ",
        "DSPY_tasks",
    )
    # another deployment on the same account shares nothing
    t = Subjects("team-b")
    assert t.task("optimize") == "team-b.task.optimize"
    assert t.task_stream == "TEAM_B_TASKS"
    assert t.bucket("roles") == "TEAM_B_roles"


@pytest.mark.parametrize(
    "make",
    [
        lambda: Subjects("a.b"),
        lambda: Subjects(""),
        lambda: Subjects().task("opt.*"),
        lambda: Subjects().task(">"),
        lambda: Subjects().endpoint("agent", "a b"),
        lambda: Subjects().event("cycle..done"),
        lambda: Subjects().bucket("x.y"),
    ],
)
def test_subject_tokens_are_checked(make: object) -> None:
    with pytest.raises(ValueError, match="must be"):
        make()  # type: ignore[operator]


class Point(Message):
    x: int
    y: int = 0


def test_decode_round_trip() -> None:
    assert decode(Point, encode(Point(x=1, y=2))) == Point(x=1, y=2)
    assert decode(Point, b'{"x": 3}') == Point(x=3)


@pytest.mark.parametrize(
    ("data", "loc", "kind"),
    [
        (b'{"x": "one"}', "x", "int_parsing"),
        (b"{}", "x", "missing"),
        (b"", "x", "missing"),  # an empty body is an empty object
        (b'{"x": 1, "z": 2}', "z", "extra_forbidden"),
        (b"not json", "(body)", "json_invalid"),
        (b'{"x": "\xff"}', "(body)", "json_invalid"),
        (b"[]", "(body)", "model_type"),
    ],
)
def test_decode_errors_name_the_field(data: bytes, loc: str, kind: str) -> None:
    with pytest.raises(MessageValidationError) as caught:
        decode(Point, data)
    error = caught.value
    assert error.code == "invalid_message"
    assert [(fe.loc, fe.type) for fe in error.field_errors] == [(loc, kind)]
    assert error.message.startswith("Point payload is invalid: 1 error(s)")
    assert error.to_body().field_errors == error.field_errors


def test_decode_errors_are_bounded() -> None:
    class Many(Message):
        values: list[int]

    with pytest.raises(MessageValidationError) as caught:
        decode(Many, b'{"values": [' + b",".join([b'"x"'] * 500) + b"]}")
    assert "500 error(s)" in caught.value.message
    assert len(caught.value.field_errors) == MAX_FIELD_ERRORS


def test_a_payload_with_too_many_errors_to_list_is_refused_without_listing_them() -> None:
    class Strict(Message):
        text: str = ""

    unknown = b",".join(b'"k%d": 1' % i for i in range(LISTED_ERRORS_LIMIT + 1))
    with pytest.raises(MessageValidationError) as caught:
        decode(Strict, b"{" + unknown + b"}")
    assert f"{LISTED_ERRORS_LIMIT + 1} error(s) (too many to list)" in caught.value.message
    assert caught.value.field_errors == []


def test_check_size_names_size_and_limit() -> None:
    limit = 1024 * 1024
    assert check_size(b"x" * (limit - HEADER_ALLOWANCE), limit) == b"x" * (limit - HEADER_ALLOWANCE)
    with pytest.raises(PayloadTooLargeError) as caught:
        check_size(b"x" * limit, limit, "reply of select")
    usable = limit - HEADER_ALLOWANCE
    assert str(caught.value) == (
        f"payload_too_large: reply of select is {limit} bytes, over the server's limit of {usable} bytes"
    )


def test_error_body_keeps_codes() -> None:
    assert error_body(PayloadTooLargeError(10, 5)).code == "payload_too_large"
    assert error_body(DspyrtError("slow", code="timeout")).model_dump() == {
        "code": "timeout",
        "message": "slow",
        "field_errors": [],
    }
    foreign = error_body(KeyError("k"))
    assert (foreign.code, foreign.message) == ("internal", "KeyError: 'k'")


def test_public_surface_is_pinned() -> None:
    assert bus_package.__all__ == sorted(bus_package.__all__)
    assert all(hasattr(bus_package, name) for name in bus_package.__all__)
    errors = [getattr(bus_package, n) for n in bus_package.__all__ if n.endswith("Error") and n != "FieldError"]
    assert all(issubclass(e, DspyrtError) for e in errors)

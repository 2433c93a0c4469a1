"""Program specs: building real DSPy modules, hashing, validation, registered programs and state round trips."""

from __future__ import annotations

import json
import sys
from importlib.metadata import EntryPoint
from typing import Any

import dspy
import pytest

from dspyrt.agents.lm import demo_lm
from dspyrt.agents.programs import (
    ENTRY_POINT_GROUP,
    HasForward,
    ProgramRegistry,
    ProgramSpec,
    build_program,
    dump_program_state,
    load_program_state,
    parse_program_spec,
    program_hash,
)
from dspyrt.bus.errors import ConfigurationError, MessageValidationError, NotFoundError

pytestmark = pytest.mark.timeout(30)


class QAProgram(dspy.Module):  # type: ignore[misc]
    """A registered program class (a dspy.Module)."""

    def __init__(self) -> None:
        super().__init__()
        self.answer = dspy.Predict("question -> answer")

    def forward(self, question: str) -> Any:
        return self.answer(question=question)


class Shouter:
    """A registered object that is not a dspy.Module, only has forward."""

    def forward(self, text: str) -> Any:
        return dspy.Prediction(text=text.upper())


SHARED_INSTANCE = QAProgram()


def registry(**targets: str) -> ProgramRegistry:
    return ProgramRegistry(
        EntryPoint(name=name, value=f"{__name__}:{attr}", group=ENTRY_POINT_GROUP) for name, attr in targets.items()
    )


def test_signature_spec_builds_predict_that_runs() -> None:
    spec = ProgramSpec(signature="question ->   answer", instructions="Answer in one word.")
    program = build_program(spec)
    assert isinstance(program, dspy.Predict)
    assert program.signature.instructions == "Answer in one word."
    assert list(program.signature.input_fields) == ["question"]
    assert list(program.signature.output_fields) == ["answer"]
    with dspy.context(lm=demo_lm()):
        assert program(question="anything").answer == "unknown"


def test_fields_spec_builds_typed_chain_of_thought() -> None:
    spec = ProgramSpec(
        fields=[
            {"name": "text", "role": "input", "description": "a review"},
            {"name": "stars", "role": "output", "type": "int", "description": "1 to 5"},
            {"name": "keywords", "role": "output", "type": "list[str]"},
        ],
        module="ChainOfThought",
    )
    program = build_program(spec)
    assert isinstance(program, dspy.ChainOfThought)
    signature = program.predict.signature
    assert list(signature.output_fields) == ["reasoning", "stars", "keywords"]
    assert signature.output_fields["stars"].annotation is int
    assert signature.input_fields["text"].json_schema_extra["desc"] == "a review"
    program.predict.demos = [dspy.Example(text="great food", stars=5, keywords=["food"]).with_inputs("text")]
    with dspy.context(lm=demo_lm()):
        result = program(text="great food here")
    assert (result.stars, result.keywords) == (5, ["food"])


def test_signature_types_come_from_the_allowed_list_only() -> None:
    program = build_program(ProgramSpec(signature="a: int, b: list[str] -> ok: bool"))
    assert program.signature.input_fields["a"].annotation is int
    assert program.signature.output_fields["ok"].annotation is bool
    assert "antigravity" not in sys.modules
    with pytest.raises(ValueError, match="unknown type 'antigravity'"):
        ProgramSpec(signature="q: antigravity -> a")
    assert "antigravity" not in sys.modules  # DSPy's resolver would have imported it


def test_program_hash_is_stable_and_canonical() -> None:
    spec = ProgramSpec(signature="question -> answer")
    assert program_hash(spec) == "11fd748e84d752dd045e04c341dfacf7a80ccd1d23c1d08430d1ae3f94eef572"
    same = parse_program_spec({"module": "Predict", "signature": "  question  ->  answer "})
    assert program_hash(same) == program_hash(spec)
    assert program_hash(ProgramSpec(signature="question -> answer", module="ChainOfThought")) != program_hash(spec)
    assert program_hash(ProgramSpec(signature="question -> answer", instructions="x")) != program_hash(spec)


@pytest.mark.parametrize(
    ("data", "loc", "needle"),
    [
        ({"signature": "question answer"}, "signature", "exactly one '->'"),
        ({"signature": "a b -> c"}, "signature", "cannot read the input fields"),
        ({"signature": "q -> "}, "signature", "at least one output"),
        ({"signature": "q=1 -> a"}, "signature", "plain 'name'"),
        ({"signature": "q: dict -> a"}, "signature", "unknown type 'dict'"),
        ({"fields": [{"name": "q", "role": "input", "type": "tuple"}, {"name": "a", "role": "output"}]}, "fields", ""),
        ({"signature": "q -> a", "module": "ReAct"}, "module", "Predict"),
        ({"signature": "q -> a", "registered": "qa"}, "spec", "exactly one"),
        ({}, "spec", "exactly one"),
        ({"registered": "qa", "module": "Predict"}, "spec", "takes no module"),
        ({"signature": "q, q -> a"}, "spec", "duplicate field name(s): q"),
        ({"signature": "json -> a"}, "spec", "reserved by dspy.Signature"),
        ({"fields": [{"name": "q", "role": "input"}]}, "spec", "at least one input and one output"),
        ({"signature": "reasoning -> a", "module": "ChainOfThought"}, "spec", "own 'reasoning'"),
        ({"signature": "q -> a", "code": "import os"}, "code", "Extra inputs"),
    ],
)
def test_invalid_specs_give_structured_errors(data: dict[str, Any], loc: str, needle: str) -> None:
    with pytest.raises(MessageValidationError) as caught:
        parse_program_spec(data)
    error = caught.value
    assert error.code == "invalid_message"
    assert any(f.loc.startswith(loc) for f in error.field_errors), error.field_errors
    assert needle in error.message


def test_registered_program_comes_from_entry_points_only() -> None:
    programs = registry(qa="QAProgram", shout="Shouter", shared="SHARED_INSTANCE")
    assert programs.names() == ["qa", "shared", "shout"]

    qa = build_program(ProgramSpec(registered="qa"), registry=programs)
    assert isinstance(qa, QAProgram)
    assert build_program(ProgramSpec(registered="qa"), registry=programs) is not qa

    shout = build_program(ProgramSpec(registered="shout"), registry=programs)
    assert isinstance(shout, dspy.Module) and isinstance(shout, HasForward)
    assert shout(text="hi").text == "HI"

    shared = build_program(ProgramSpec(registered="shared"), registry=programs)
    shared.answer.demos.append(dspy.Example(question="q", answer="a"))
    assert SHARED_INSTANCE.answer.demos == []  # a registered instance is copied, never shared

    with pytest.raises(NotFoundError, match="unknown registered program 'rag'; known: qa, shared, shout") as err:
        build_program(ProgramSpec(registered="rag"), registry=programs)
    assert err.value.code == "not_found"


def test_installed_entry_points_are_the_default_registry() -> None:
    with pytest.raises(NotFoundError, match="unknown registered program 'no-such-program'"):
        build_program(ProgramSpec(registered="no-such-program"))


def test_broken_registrations_are_configuration_errors() -> None:
    broken = ProgramRegistry([EntryPoint(name="gone", value="tests.agents.no_such_module:X", group=ENTRY_POINT_GROUP)])
    with pytest.raises(ConfigurationError, match="cannot be loaded"):
        broken.create("gone")
    with pytest.raises(ConfigurationError, match="neither a class, a factory nor a program"):
        registry(text="__doc__").create("text")  # a string
    no_forward = ProgramRegistry([EntryPoint(name="d", value="builtins:dict", group=ENTRY_POINT_GROUP)])
    with pytest.raises(ConfigurationError, match="has no forward"):
        no_forward.create("d")
    with pytest.raises(ConfigurationError, match="registered twice"):
        ProgramRegistry(
            [
                EntryPoint(name="x", value="a:B", group=ENTRY_POINT_GROUP),
                EntryPoint(name="x", value="c:D", group=ENTRY_POINT_GROUP),
            ]
        )


def test_state_round_trip_after_labeled_few_shot() -> None:
    spec = ProgramSpec(signature="sentence -> topic")
    trainset = [
        dspy.Example(sentence="the team scored a goal", topic="sports").with_inputs("sentence"),
        dspy.Example(sentence="bake the bread in the oven", topic="cooking").with_inputs("sentence"),
    ]
    compiled = dspy.LabeledFewShot(k=2).compile(build_program(spec), trainset=trainset)
    state = dump_program_state(compiled)
    wire = json.loads(json.dumps(state))  # what crosses the bus

    restored = load_program_state(spec, wire)
    assert isinstance(restored, dspy.Predict)
    assert [d["topic"] for d in restored.demos] == [d.topic for d in compiled.demos]
    with dspy.context(lm=demo_lm()):
        assert restored(sentence="a late goal by the team").topic == "sports"
        assert build_program(spec)(sentence="a late goal by the team").topic == "unknown"


def test_dumped_state_never_carries_api_keys() -> None:
    program = build_program(ProgramSpec(signature="q -> a"))
    program.lm = dspy.LM("openai/gpt-4o-mini", api_key="sk-test-SECRET-123", cache=False)
    state = dump_program_state(program)
    assert state["lm"]["model"] == "openai/gpt-4o-mini"
    assert "sk-test-SECRET-123" not in json.dumps(state)

    class Leaky:
        def dump_state(self) -> dict[str, Any]:
            return {"predict": {"lm": {"model": "x", "api_key": "sk-leak"}}}

    with pytest.raises(ConfigurationError, match=r"predict\.lm\.api_key"):
        dump_program_state(Leaky())

    # A task whose own field is called "password" is data, not a credential.
    program.lm = None
    program.demos = [dspy.Example(q="hunter2", a="weak", password="hunter2").with_inputs("q")]
    assert dump_program_state(program)["demos"][0]["password"] == "hunter2"


def test_lm_settings_in_state_are_refused_unless_allowed() -> None:
    spec = ProgramSpec(signature="q -> a")
    program = build_program(spec)
    program.lm = dspy.LM("openai/gpt-4o-mini", cache=False)
    state = dump_program_state(program)
    with pytest.raises(MessageValidationError) as refused:
        load_program_state(spec, state)
    assert [f.loc for f in refused.value.field_errors] == ["lm"]
    restored = load_program_state(spec, state, allow_lm_state=True)
    assert restored.lm.model == "openai/gpt-4o-mini"


def test_state_that_does_not_fit_is_rejected() -> None:
    spec = ProgramSpec(signature="q -> a", module="ChainOfThought")
    good = dump_program_state(build_program(spec))
    assert set(good) == {"predict"}

    with pytest.raises(MessageValidationError) as wrong_parts:
        load_program_state(spec, {"other": {}})
    assert {(f.loc, f.message) for f in wrong_parts.value.field_errors} == {
        ("predict", "missing from state"),
        ("other", "not a part of this program"),
    }

    hostile = {"predict": {**good["predict"], "forward": "x"}}  # Predict.load_state would setattr() it
    with pytest.raises(MessageValidationError) as extra_key:
        load_program_state(spec, hostile)
    assert [f.loc for f in extra_key.value.field_errors] == ["predict.forward"]

    with pytest.raises(MessageValidationError, match="cannot be loaded"):
        load_program_state(spec, {"predict": {"demos": []}})

"""An offline, deterministic DEMO/TEST language model: it answers like its nearest few-shot demo.

This is not a language model. It is a stand-in for demos and tests, on DSPy 3.4's engine contract
(``complete(dspy.lm15.Request) -> dspy.lm15.Response``, ``stream``, ``close``; an async twin for
``async_engine=``). It reads the prompt DSPy's ChatAdapter or JSONAdapter rendered:

* the system message lists the signature's fields (``Your input fields are: 1. `question` (str): ...``);
* each few-shot demo is a user turn of ``[[ ## field ## ]]`` input sections followed by an assistant turn
  with the demo's outputs (``[[ ## field ## ]]`` sections, or a JSON object under the JSONAdapter);
* the last user turn holds the current inputs.

It answers with the output values of the demo whose input values are most similar to the current ones
(Jaccard similarity of their word sets), formatted the way the adapter parses. With no demo that shares a
word with the inputs it answers a fixed fallback for every output field (``"unknown"`` for text, a zero
value of the declared type otherwise). Usage is counted in whitespace tokens, so cost accounting works.

Consequence: a ``dspy.Predict`` scores low without demos and higher after ``dspy.LabeledFewShot`` when test
inputs resemble training inputs: optimizing demos measurably changes what the program answers.
"""

from __future__ import annotations

import ast
import hashlib
import itertools
import json
import re
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import dspy
from dspy.lm15 import Message, Request, Response, Usage, response_to_events

MODEL = "demo/fewshot"
"""The model string the demo engine is registered under."""

_MARKER = re.compile(r"\[\[ ## (\w+) ## \]\]")
_FIELD_LINE = re.compile(r"^\d+\. `(\w+)` \(")
_WORD = re.compile(r"\w+")
# The ChatAdapter/JSONAdapter append a format reminder to the current user turn; it is not an input value.
_REMINDER = re.compile(r"\n\s*Respond with (?:the corresponding output fields|a JSON object).*\Z", re.DOTALL)
# What the adapters write for an output a demo does not supply.
_NOT_SUPPLIED = "Not supplied for this"
_COMPLETED = "[[ ## completed ## ]]"


@dataclass(frozen=True)
class _Field:
    name: str
    type: str


@dataclass(frozen=True)
class _Turn:
    inputs: dict[str, str]
    outputs: dict[str, Any]


@dataclass(frozen=True)
class _Prompt:
    input_fields: tuple[_Field, ...]
    output_fields: tuple[_Field, ...]
    json_mode: bool
    demos: tuple[_Turn, ...]
    inputs: dict[str, str]


class DemoFewShotEngine:
    """Synchronous demo engine: answers with the outputs of the nearest few-shot demo in the prompt.

    ``fallback`` is the answer for text outputs when no demo applies; ``min_similarity`` is the Jaccard
    similarity a demo must exceed to be used (default 0: it must share at least one word).
    """

    def __init__(self, fallback: str = "unknown", min_similarity: float = 0.0) -> None:
        if not 0.0 <= min_similarity < 1.0:
            raise ValueError("min_similarity must be in [0, 1)")
        self.fallback = fallback
        self.min_similarity = min_similarity

    def complete(self, request: Request) -> Response:
        """Answer one request; never calls anything outside this process."""
        if not isinstance(request, Request):
            raise TypeError("DemoFewShotEngine.complete takes a dspy.lm15.Request")
        prompt_text = _prompt_text(request)
        text = self._answer(_parse_prompt(request))
        return Response(
            id="demo-" + hashlib.sha256(prompt_text.encode()).hexdigest()[:16],
            model=request.model,
            message=Message.assistant(text),
            finish_reason="stop",
            usage=Usage(input_tokens=_count_tokens(prompt_text), output_tokens=_count_tokens(text)),
        )

    def stream(self, request: Request) -> Iterator[Any]:
        """The complete answer as lm15 stream events (start, one text delta, end)."""
        events: Iterator[Any] = response_to_events(self.complete(request))
        return events

    def close(self) -> None:
        """Nothing to release: the engine holds no connection."""

    def dump_state(self) -> dict[str, Any]:
        """JSON-able settings, so a program whose LM uses this engine can be saved (``LM.dump_state``)."""
        return {"fallback": self.fallback, "min_similarity": self.min_similarity}

    @classmethod
    def load_state(cls, state: Mapping[str, Any]) -> DemoFewShotEngine:
        """Rebuild an engine from :meth:`dump_state`."""
        return cls(fallback=str(state.get("fallback", "unknown")), min_similarity=float(state.get("min_similarity", 0)))

    def _answer(self, prompt: _Prompt) -> str:
        demo = self._nearest(prompt)
        values: dict[str, Any] = {}
        for field in prompt.output_fields:
            value = demo.outputs.get(field.name) if demo is not None else None
            if value is None or (isinstance(value, str) and value.strip().startswith(_NOT_SUPPLIED)):
                value = _fallback_value(field.type, self.fallback)
            values[field.name] = value
        if not prompt.output_fields:
            return self.fallback
        if prompt.json_mode:
            return json.dumps(values, ensure_ascii=False)
        sections = [f"[[ ## {name} ## ]]\n{_as_text(value)}" for name, value in values.items()]
        return "\n\n".join([*sections, _COMPLETED])

    def _nearest(self, prompt: _Prompt) -> _Turn | None:
        current = _words(prompt.inputs.values())
        best: _Turn | None = None
        best_score = self.min_similarity
        for demo in prompt.demos:
            score = _jaccard(current, _words(demo.inputs.values()))
            if score > best_score:  # strict: ties keep the earlier demo, so the answer is deterministic
                best, best_score = demo, score
        return best


class AsyncDemoFewShotEngine:
    """The async twin of :class:`DemoFewShotEngine`, for ``dspy.LM(..., async_engine=...)``."""

    def __init__(self, sync: DemoFewShotEngine | None = None) -> None:
        self.sync = sync if sync is not None else DemoFewShotEngine()

    async def complete(self, request: Request) -> Response:
        """Answer one request (pure computation: nothing to await)."""
        return self.sync.complete(request)

    async def stream(self, request: Request) -> AsyncIterator[Any]:
        """The complete answer as lm15 stream events."""
        for event in self.sync.stream(request):
            yield event

    async def aclose(self) -> None:
        """Nothing to release."""

    def dump_state(self) -> dict[str, Any]:
        """JSON-able settings (see :meth:`DemoFewShotEngine.dump_state`)."""
        return self.sync.dump_state()

    @classmethod
    def load_state(cls, state: Mapping[str, Any]) -> AsyncDemoFewShotEngine:
        """Rebuild an engine from :meth:`dump_state`."""
        return cls(DemoFewShotEngine.load_state(state))


def demo_lm(
    model: str = MODEL,
    *,
    fallback: str = "unknown",
    min_similarity: float = 0.0,
    faults: Any = None,
    num_retries: int = 3,
) -> Any:
    """A ``dspy.LM`` backed by the demo engine (sync and async), with DSPy's response cache off.

    ``faults`` (a ``FaultProfile``) puts the fault/latency wrapper in front of both engines, sharing one
    injector so the sync and async paths draw from the same sequence.
    """
    engine, async_engine = demo_engines(fallback=fallback, min_similarity=min_similarity, faults=faults)
    return dspy.LM(model, engine=engine, async_engine=async_engine, cache=False, num_retries=num_retries)


def demo_engines(*, fallback: str = "unknown", min_similarity: float = 0.0, faults: Any = None) -> tuple[Any, Any]:
    """The demo engine pair (sync, async), behind the fault wrapper when ``faults`` is given."""
    engine: Any = DemoFewShotEngine(fallback=fallback, min_similarity=min_similarity)
    async_engine: Any = AsyncDemoFewShotEngine(engine)
    if faults is not None:
        from dspyrt.agents.lm.faults import AsyncFaultyEngine, FaultInjector, FaultyEngine

        injector = FaultInjector(faults)
        engine, async_engine = FaultyEngine(engine, injector), AsyncFaultyEngine(async_engine, injector)
    return engine, async_engine


def _parse_prompt(request: Request) -> _Prompt:
    system = _system_text(request)
    input_fields = _declared_fields(system, "Your input fields are:", "Your output fields are:")
    output_fields = _declared_fields(system, "Your output fields are:", "All interactions will be structured")
    json_mode = "Outputs will be a JSON object" in system or request.config.response_format is not None
    input_names = {f.name for f in input_fields}
    messages = [(m.role, m.text or "") for m in request.messages]
    demos: list[_Turn] = []
    for (role, text), (next_role, next_text) in itertools.pairwise(messages[:-1]):
        if role == "user" and next_role == "assistant":
            outputs = _parse_outputs(next_text, json_mode)
            if outputs:
                demos.append(_Turn(_only(_sections(text), input_names), outputs))
    current = _REMINDER.sub("", messages[-1][1]) if messages and messages[-1][0] == "user" else ""
    return _Prompt(input_fields, output_fields, json_mode, tuple(demos), _only(_sections(current), input_names))


def _system_text(request: Request) -> str:
    system = request.system
    if system is None:
        return ""
    if isinstance(system, str):
        return system
    return "".join(getattr(part, "text", "") or "" for part in system)


def _prompt_text(request: Request) -> str:
    return "\n".join([_system_text(request), *(m.text or "" for m in request.messages)])


def _declared_fields(system: str, start: str, end: str) -> tuple[_Field, ...]:
    """Fields of one section of the adapter's field list: ``1. `name` (type): description``."""
    begin = system.find(start)
    if begin < 0:
        return ()
    stop = system.find(end, begin + len(start))
    block = system[begin + len(start) : stop if stop >= 0 else len(system)]
    fields = []
    for line in block.splitlines():
        match = _FIELD_LINE.match(line)
        if match:
            fields.append(_Field(match.group(1), _balanced(line[match.end() :])))
    return tuple(fields)


def _balanced(rest: str) -> str:
    """The text up to the parenthesis closing an already-opened one (types like ``dict[str, list[int]]``)."""
    depth = 1
    for index, char in enumerate(rest):
        if char in "([":
            depth += 1
        elif char in ")]":
            depth -= 1
            if depth == 0:
                return rest[:index]
    return rest


def _sections(text: str) -> dict[str, str]:
    """``[[ ## name ## ]]`` sections of a message, as the ChatAdapter splits them."""
    found: dict[str, str] = {}
    matches = list(_MARKER.finditer(text))
    for index, match in enumerate(matches):
        end = matches[index + 1].start() if index + 1 < len(matches) else len(text)
        if match.group(1) != "completed":
            found[match.group(1)] = text[match.end() : end].strip()
    return found


def _parse_outputs(text: str, json_mode: bool) -> dict[str, Any]:
    if json_mode:
        try:
            value = json.loads(text)
        except ValueError:
            return {}
        return value if isinstance(value, dict) else {}
    return _sections(text)


def _only(values: dict[str, str], names: set[str]) -> dict[str, str]:
    return {k: v for k, v in values.items() if k in names} if names else values


def _words(values: Any) -> frozenset[str]:
    return frozenset(word for value in values for word in _WORD.findall(str(value).lower()))


def _jaccard(left: frozenset[str], right: frozenset[str]) -> float:
    union = left | right
    return len(left & right) / len(union) if union else 0.0


def _count_tokens(text: str) -> int:
    return len(text.split())


def _fallback_value(type_name: str, fallback: str) -> Any:
    """A value the adapter can parse for a field of this declared type."""
    base = type_name.strip()
    if base == "int":
        return 0
    if base == "float":
        return 0.0
    if base == "bool":
        return False
    if base.startswith(("list[", "tuple[", "set[")) or base in {"list", "tuple", "set"}:
        return []
    if base.startswith("dict[") or base == "dict":
        return {}
    if base.startswith("Literal[") and base.endswith("]"):
        try:
            options = ast.literal_eval(f"({base[len('Literal[') : -1]},)")
        except (ValueError, SyntaxError):
            return fallback
        return options[0] if options else fallback
    return fallback


def _as_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)

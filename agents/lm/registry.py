"""Which language models exist, what they cost, and how to build a ``dspy.LM`` for one.

A model is one ``[[models]]`` table in a TOML file; a real provider is one line of configuration::

    [[models]]
    model = "openai/gpt-4o-mini"
    api_key_env = "OPENAI_API_KEY"          # the NAME of the variable, never the key
    input_cost_per_million = 0.15
    output_cost_per_million = 0.60
    tags = ["fast", "classification"]
    fallback = ["demo/fewshot"]             # tried, in order, when this model fails transiently

Credentials come only from the environment, read when the LM is built; a :class:`ModelSpec` never holds
one, so no repr, str or dump of it can leak a key. ``demo/...`` models use the offline demo engine.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dspyrt.agents.lm.cache import disable_dspy_cache
from dspyrt.agents.lm.demo import MODEL as DEMO_MODEL
from dspyrt.agents.lm.demo import demo_lm
from dspyrt.agents.lm.faults import FaultProfile
from dspyrt.bus.errors import ConfigurationError, NotFoundError

DEMO_PREFIX = "demo/"
_SECRET_KEYS = frozenset({"api_key", "apikey", "key", "secret", "token", "password"})


class ModelSpec(BaseModel):
    """One model: its ``dspy.LM`` model string, prices, limits, what it suits and where its key lives."""

    # Inputs are hidden in validation errors: a key pasted into the wrong field must not be echoed.
    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

    model: str = Field(min_length=1, description="any dspy.LM model string, e.g. 'openai/gpt-4o-mini'")
    input_cost_per_million: float = Field(default=0.0, ge=0, description="USD per million input tokens")
    output_cost_per_million: float = Field(default=0.0, ge=0, description="USD per million output tokens")
    context_window: int = Field(default=8192, gt=0, description="tokens")
    max_concurrency: int = Field(default=4, gt=0, description="calls in flight at once")
    rate_limit_per_minute: int | None = Field(default=None, gt=0, description="requests per minute; None: no limit")
    tags: tuple[str, ...] = Field(default=(), description="roles and task kinds this model suits")
    api_key_env: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="name of the environment variable holding the API key",
    )
    api_base: str | None = Field(default=None, description="endpoint override, e.g. a local OpenAI-compatible server")
    temperature: float | None = Field(default=None, ge=0, le=2)
    max_tokens: int | None = Field(default=None, gt=0)
    fallback: tuple[str, ...] | None = Field(
        default=None,
        description="models tried in order when this one fails transiently; None: the file's default chain",
    )
    # Demo models only: injected latency and failures, for benchmarks and fault tests.
    faults: FaultProfile | None = None

    @model_validator(mode="before")
    @classmethod
    def _no_inline_secrets(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            inline = sorted(k for k in data if isinstance(k, str) and k.lower() in _SECRET_KEYS)
            if inline:
                raise ValueError(
                    f"{', '.join(inline)} is not accepted: put the key in an environment variable "
                    "and name that variable in api_key_env"
                )
        return data

    @field_validator("model")
    @classmethod
    def _model_string(cls, value: str) -> str:
        _, sep, rest = value.partition("/")
        if value != value.strip() or (sep and not rest):
            raise ValueError("model must be 'provider/name' (or a bare name), without surrounding spaces")
        return value

    @model_validator(mode="after")
    def _faults_on_demo_only(self) -> ModelSpec:
        if self.faults is not None and not self.is_demo:
            raise ValueError("faults can only be injected into demo/... models")
        return self

    @property
    def is_demo(self) -> bool:
        """Whether this is the offline demo/test model (no network, no key)."""
        return self.model.startswith(DEMO_PREFIX)

    def cost(self, input_tokens: int, output_tokens: int) -> float:
        """USD for this many tokens at this model's prices."""
        return (input_tokens * self.input_cost_per_million + output_tokens * self.output_cost_per_million) / 1e6


class ModelRegistry:
    """The configured models, by model string. Immutable once built."""

    def __init__(self, models: Iterable[ModelSpec], *, fallback: Iterable[str] = ()) -> None:
        by_name: dict[str, ModelSpec] = {}
        for spec in models:
            if spec.model in by_name:
                raise ConfigurationError(f"model {spec.model!r} is configured twice")
            by_name[spec.model] = spec
        self._models = by_name
        self.default_fallback = tuple(fallback)
        chains = [("fallback", self.default_fallback)]
        chains += [(f"{s.model}'s fallback", s.fallback) for s in by_name.values() if s.fallback]
        for where, chain in chains:
            unknown = [m for m in chain if m not in by_name]
            if unknown:
                raise ConfigurationError(
                    f"{where} names unconfigured model(s) {', '.join(unknown)}; known: {', '.join(sorted(by_name))}"
                )

    def fallback_chain(self, model: str) -> list[str]:
        """The models tried after ``model`` fails: its own ``fallback`` list, else the file's default chain."""
        spec = self.get(model)
        chain = spec.fallback if spec.fallback is not None else self.default_fallback
        return [m for i, m in enumerate(chain) if m != model and m not in chain[:i]]

    @classmethod
    def default(cls) -> ModelRegistry:
        """Just the offline demo model."""
        return cls([ModelSpec(model=DEMO_MODEL, context_window=32_768, max_concurrency=64, tags=("demo", "test"))])

    @classmethod
    def from_toml(cls, path: str | os.PathLike[str]) -> ModelRegistry:
        """Load ``[[models]]`` tables from a TOML file; errors name the file and the offending entry."""
        file = Path(path)
        try:
            data = tomllib.loads(file.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ConfigurationError(f"model file {file} does not exist") from exc
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigurationError(f"model file {file} cannot be read: {exc}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigurationError(f"model file {file} is not valid TOML: {exc}") from exc
        return cls.from_mapping(data, source=str(file))

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, source: str = "model configuration") -> ModelRegistry:
        """Build from parsed configuration: ``{"fallback": [...], "models": [{...}, ...]}``."""
        unknown = sorted(set(data) - {"models", "fallback"})
        if unknown:
            raise ConfigurationError(
                f"{source}: unknown top-level key(s) {', '.join(unknown)}; expected [[models]] and fallback"
            )
        fallback = data.get("fallback", [])
        if not isinstance(fallback, list) or not all(isinstance(m, str) for m in fallback):
            raise ConfigurationError(f"{source}: fallback must be a list of model strings")
        entries = data.get("models")
        if not isinstance(entries, list) or not entries:
            raise ConfigurationError(f"{source}: expected at least one [[models]] table")
        specs = []
        for index, entry in enumerate(entries):
            try:
                specs.append(ModelSpec.model_validate(entry))
            except ValidationError as exc:
                problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'entry'}: {e['msg']}" for e in exc.errors())
                raise ConfigurationError(f"{source}: models[{index}] is invalid: {problems}") from None
        try:
            return cls(specs, fallback=fallback)
        except ConfigurationError as exc:
            raise ConfigurationError(f"{source}: {exc.message}") from None

    def get(self, model: str) -> ModelSpec:
        """The spec for a model string; :class:`NotFoundError` lists the known ones."""
        try:
            return self._models[model]
        except KeyError:
            raise NotFoundError(f"unknown model {model!r}; known: {', '.join(sorted(self._models))}") from None

    def with_tag(self, tag: str) -> list[ModelSpec]:
        """Models tagged ``tag``, in configuration order."""
        return [spec for spec in self._models.values() if tag in spec.tags]

    def __iter__(self) -> Iterator[ModelSpec]:
        return iter(self._models.values())

    def __len__(self) -> int:
        return len(self._models)

    def __contains__(self, model: object) -> bool:
        return model in self._models

    def __repr__(self) -> str:
        return f"ModelRegistry({sorted(self._models)})"


def build_lm(spec: ModelSpec, *, environ: Mapping[str, str] | None = None, num_retries: int = 3) -> Any:
    """A ``dspy.LM`` for this spec.

    ``demo/...`` models get the offline demo engine (sync and async, response cache off). Any other model
    string is a real provider: ``dspy.LM(model, api_key=<value of api_key_env>)``. ``environ`` defaults to
    ``os.environ``; a missing or empty variable is a :class:`ConfigurationError` naming the variable.
    """
    disable_dspy_cache()
    if spec.is_demo:
        return demo_lm(spec.model, faults=spec.faults, num_retries=num_retries)
    import dspy

    # DSPy refreshes its model price list from the network on the first call unless this is set: no network
    # at run time but the provider's (set it to false yourself to allow the refresh).
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    env = os.environ if environ is None else environ
    options: dict[str, Any] = {}
    if spec.api_key_env is not None:
        key = env.get(spec.api_key_env)
        if not key:
            raise ConfigurationError(
                f"model {spec.model!r} reads its API key from the environment variable {spec.api_key_env}, "
                "which is not set"
            )
        options["api_key"] = key
    if spec.api_base is not None:
        options["api_base"] = spec.api_base
    if spec.temperature is not None:
        options["temperature"] = spec.temperature
    if spec.max_tokens is not None:
        options["max_tokens"] = spec.max_tokens
    from dspy.utils.exceptions import DSPyError

    try:
        # cache=False: the switcher's cache is the system's one (agents.lm.cache).
        return dspy.LM(spec.model, num_retries=num_retries, cache=False, **options)
    except (TypeError, ValueError, DSPyError) as exc:
        raise ConfigurationError(f"model {spec.model!r} cannot be built: {exc}") from exc

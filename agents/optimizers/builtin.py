"""The built-in optimizers: DSPy's own LabeledFewShot, BootstrapFewShot, BootstrapFewShotWithRandomSearch, MIPROv2,
COPRO, SIMBA and GEPA, each behind the ``Optimizer`` protocol (``dspyrt.agents.optimizers.protocol``) with a
pydantic model of its parameters: unknown or mistyped ones are errors, never passed through blindly.

``dspyrt.agents.optimizers.reference`` documents every optimizer from these params models.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import dspy
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from dspyrt.agents.optimizers.protocol import CompileContext, OptimizerFactory
from dspyrt.bus import MessageValidationError
from dspyrt.bus.messages import field_errors_of


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _params(model: type[_Params], params: dict[str, Any], optimizer: str) -> Any:
    try:
        return model.model_validate(params)
    except ValidationError as exc:
        raise MessageValidationError(f"invalid parameters for optimizer {optimizer}", field_errors_of(exc)) from exc


class _BuiltinOptimizer:
    """A built-in optimizer's parameters, validated once: a params dict (what the registry's factories pass) or
    keywords, as the guide writes them (``LabeledFewShotOptimizer(k=16)``); keywords win over the dict."""

    name: ClassVar[str]
    params_model: ClassVar[type[_Params]]

    def __init__(self, params: dict[str, Any] | None = None, /, **kwargs: Any) -> None:
        self.params: Any = _params(self.params_model, {**(params or {}), **kwargs}, self.name)


class LabeledFewShotParams(_Params):
    k: int = Field(default=16, ge=1, le=1000)
    sample: bool = True


class LabeledFewShotOptimizer(_BuiltinOptimizer):
    """DSPy's LabeledFewShot with k=16 by default: up to k labelled examples become each predictor's demos."""

    name = "labeled_fewshot"
    params_model = LabeledFewShotParams
    params: LabeledFewShotParams

    def compile(self, ctx: CompileContext) -> Any:
        teleprompter = dspy.LabeledFewShot(k=self.params.k)
        return teleprompter.compile(ctx.student, trainset=ctx.trainset, sample=self.params.sample)


class BootstrapParams(_Params):
    max_bootstrapped_demos: int = Field(default=4, ge=0, le=64)
    max_labeled_demos: int = Field(default=16, ge=0, le=256)
    max_rounds: int = Field(default=1, ge=1, le=10)
    metric_threshold: float | None = None


class BootstrapFewShotOptimizer(_BuiltinOptimizer):
    name = "bootstrap_fewshot"
    params_model = BootstrapParams
    params: BootstrapParams

    def compile(self, ctx: CompileContext) -> Any:
        p = self.params
        teleprompter = dspy.BootstrapFewShot(
            metric=ctx.metric,
            metric_threshold=p.metric_threshold,
            max_bootstrapped_demos=p.max_bootstrapped_demos,
            max_labeled_demos=p.max_labeled_demos,
            max_rounds=p.max_rounds,
        )
        return teleprompter.compile(ctx.student, trainset=ctx.trainset)


class RandomSearchParams(BootstrapParams):
    num_candidate_programs: int = Field(default=8, ge=1, le=64)
    stop_at_score: float | None = None


class RandomSearchOptimizer(_BuiltinOptimizer):
    name = "random_search"
    params_model = RandomSearchParams
    params: RandomSearchParams

    def compile(self, ctx: CompileContext) -> Any:
        p = self.params
        teleprompter = dspy.BootstrapFewShotWithRandomSearch(
            metric=ctx.metric,
            max_bootstrapped_demos=p.max_bootstrapped_demos,
            max_labeled_demos=p.max_labeled_demos,
            max_rounds=p.max_rounds,
            num_candidate_programs=p.num_candidate_programs,
            num_threads=ctx.num_threads,
            stop_at_score=p.stop_at_score,
            metric_threshold=p.metric_threshold,
        )
        return teleprompter.compile(ctx.student, trainset=ctx.trainset, valset=ctx.valset)


class MiproParams(_Params):
    auto: Literal["light", "medium", "heavy"] | None = "light"
    num_candidates: int | None = Field(default=None, ge=1, le=64)
    num_trials: int | None = Field(default=None, ge=1, le=500)
    max_bootstrapped_demos: int = Field(default=4, ge=0, le=64)
    max_labeled_demos: int = Field(default=4, ge=0, le=256)
    minibatch: bool = True
    minibatch_size: int = Field(default=35, ge=1)

    @model_validator(mode="after")
    def _auto_or_counts(self) -> MiproParams:
        if self.auto is None and (self.num_candidates is None or self.num_trials is None):
            raise ValueError("with auto=null give num_candidates and num_trials")
        return self


class MiproV2Optimizer(_BuiltinOptimizer):
    name = "mipro_v2"
    params_model = MiproParams
    params: MiproParams

    def compile(self, ctx: CompileContext) -> Any:
        p = self.params
        teleprompter = dspy.MIPROv2(
            metric=ctx.metric,
            auto=p.auto,
            num_candidates=p.num_candidates,
            max_bootstrapped_demos=p.max_bootstrapped_demos,
            max_labeled_demos=p.max_labeled_demos,
            num_threads=ctx.num_threads,
            seed=ctx.seed,
            verbose=False,
        )
        return teleprompter.compile(
            ctx.student,
            trainset=ctx.trainset,
            valset=ctx.valset,
            num_trials=p.num_trials,
            minibatch=p.minibatch and len(ctx.valset) > p.minibatch_size,
            minibatch_size=p.minibatch_size,
            seed=ctx.seed,
        )


class CoproParams(_Params):
    breadth: int = Field(default=4, ge=2, le=64)
    depth: int = Field(default=2, ge=1, le=10)
    init_temperature: float = Field(default=1.4, ge=0, le=2)


class CoproOptimizer(_BuiltinOptimizer):
    name = "copro"
    params_model = CoproParams
    params: CoproParams

    def compile(self, ctx: CompileContext) -> Any:
        p = self.params
        teleprompter = dspy.COPRO(
            metric=ctx.metric, breadth=p.breadth, depth=p.depth, init_temperature=p.init_temperature
        )
        return teleprompter.compile(
            ctx.student, trainset=ctx.trainset, eval_kwargs={"num_threads": ctx.num_threads, "display_progress": False}
        )


class SimbaParams(_Params):
    bsize: int = Field(default=8, ge=1, le=256)
    num_candidates: int = Field(default=4, ge=1, le=64)
    max_steps: int = Field(default=4, ge=1, le=100)
    max_demos: int = Field(default=4, ge=0, le=64)


class SimbaOptimizer(_BuiltinOptimizer):
    name = "simba"
    params_model = SimbaParams
    params: SimbaParams

    def compile(self, ctx: CompileContext) -> Any:
        p = self.params
        teleprompter = dspy.SIMBA(
            metric=ctx.metric,
            bsize=min(p.bsize, len(ctx.trainset)),
            num_candidates=p.num_candidates,
            max_steps=p.max_steps,
            max_demos=p.max_demos,
            num_threads=ctx.num_threads,
        )
        return teleprompter.compile(ctx.student, trainset=ctx.trainset, seed=ctx.seed)


class GepaParams(_Params):
    auto: Literal["light", "medium", "heavy"] | None = "light"
    max_metric_calls: int | None = Field(default=None, ge=1)
    reflection_minibatch_size: int = Field(default=3, ge=1)

    @model_validator(mode="after")
    def _one_budget(self) -> GepaParams:
        if (self.auto is None) == (self.max_metric_calls is None):
            raise ValueError("give exactly one of auto or max_metric_calls")
        return self


class GepaOptimizer(_BuiltinOptimizer):
    """DSPy's GEPA; the run's own LM doubles as the reflection LM."""

    name = "gepa"
    params_model = GepaParams
    params: GepaParams

    def compile(self, ctx: CompileContext) -> Any:
        p = self.params
        metric = ctx.metric

        def feedback_metric(
            gold: Any, pred: Any, trace: Any = None, pred_name: Any = None, pred_trace: Any = None
        ) -> Any:
            return float(metric(gold, pred, trace))

        teleprompter = dspy.GEPA(
            metric=feedback_metric,
            auto=p.auto,
            max_metric_calls=p.max_metric_calls,
            reflection_lm=ctx.lm,
            reflection_minibatch_size=p.reflection_minibatch_size,
            num_threads=ctx.num_threads,
            seed=ctx.seed,
        )
        return teleprompter.compile(ctx.student, trainset=ctx.trainset, valset=ctx.valset)


BUILTIN_OPTIMIZERS: dict[str, OptimizerFactory] = {
    "labeled_fewshot": LabeledFewShotOptimizer,
    "bootstrap_fewshot": BootstrapFewShotOptimizer,
    "random_search": RandomSearchOptimizer,
    "mipro_v2": MiproV2Optimizer,
    "copro": CoproOptimizer,
    "simba": SimbaOptimizer,
    "gepa": GepaOptimizer,
}

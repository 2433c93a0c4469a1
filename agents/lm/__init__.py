"""Language models for the agents: model specs and registry, the offline demo engine, fault injection."""

from dspyrt.agents.lm.demo import MODEL as DEMO_MODEL
from dspyrt.agents.lm.demo import AsyncDemoFewShotEngine, DemoFewShotEngine, demo_lm
from dspyrt.agents.lm.faults import (
    AsyncFaultyEngine,
    Fault,
    FaultInjector,
    FaultProfile,
    FaultStats,
    FaultyEngine,
    FixedLatency,
    InjectedFaultError,
    LogNormalLatency,
    RateLimitedError,
    UniformLatency,
)
from dspyrt.agents.lm.registry import ModelRegistry, ModelSpec, build_lm

__all__ = [
    "DEMO_MODEL",
    "AsyncDemoFewShotEngine",
    "AsyncFaultyEngine",
    "DemoFewShotEngine",
    "Fault",
    "FaultInjector",
    "FaultProfile",
    "FaultStats",
    "FaultyEngine",
    "FixedLatency",
    "InjectedFaultError",
    "LogNormalLatency",
    "ModelRegistry",
    "ModelSpec",
    "RateLimitedError",
    "UniformLatency",
    "build_lm",
    "demo_lm",
]

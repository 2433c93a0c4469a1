"""dspyrt: DSPy program optimization as a service, on a NATS bus.

The public API is re-exported here; import it as ``from dspyrt import Agent, Client, DSPyOptimizerManager``.
The layers live in ``dspyrt.bus`` (NATS only), ``dspyrt.runtime`` (the agent runtime, no DSPy) and
``dspyrt.agents`` (the guide's components, all DSPy).

Names resolve on first use (PEP 562): ``import dspyrt`` stays as cheap as the CLI needs it to be
(``dspyrt --help`` must not pay for DSPy, NATS or OpenTelemetry imports).
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

# name -> the module that owns it. tests/test_packaging.py imports every one.
_EXPORTS: dict[str, str] = {
    "Agent": "dspyrt.runtime.agent",
    "AssertionResult": "dspyrt.agents.assertions.models",
    "Client": "dspyrt.runtime.client",
    "CodeQualityValidator": "dspyrt.agents.assertions.code_quality",
    "CycleResult": "dspyrt.agents.loop.models",
    "DSPyAssertionFramework": "dspyrt.agents.assertions.core",
    "DSPyClient": "dspyrt.agents.api.client",
    "DSPyOptimizerManager": "dspyrt.agents.optimizers.core",
    "DspyrtError": "dspyrt.bus.errors",
    "EvaluationResult": "dspyrt.agents.loop.models",
    "Event": "dspyrt.bus.events",
    "FourPartOptimizationLoop": "dspyrt.agents.loop.core",
    "HasForward": "dspyrt.agents.programs",
    "IntegrationConfig": "dspyrt.runtime.config",
    "IntegrationMode": "dspyrt.runtime.config",
    "LabeledFewShotOptimizer": "dspyrt.agents.optimizers.builtin",
    "LogicValidator": "dspyrt.agents.assertions.logic",
    "Message": "dspyrt.bus.messages",
    "MetricsDashboard": "dspyrt.agents.dashboard.core",
    "ModelSwitcher": "dspyrt.agents.switcher.core",
    "OptimizationResult": "dspyrt.agents.optimizers.models",
    "PerformanceValidator": "dspyrt.agents.assertions.performance",
    "ProviderError": "dspyrt.agents.api.errors",
    "RemoteProgram": "dspyrt.agents.api.remote",
    "RetryPolicy": "dspyrt.runtime.agent",
    "RoleRefinementResult": "dspyrt.agents.roles.models",
    "RoleRefiner": "dspyrt.agents.roles.program",
    "SecurityValidator": "dspyrt.agents.assertions.security",
    "SignatureNotSupported": "dspyrt.agents.api.errors",
    "SyncDSPyClient": "dspyrt.agents.api.sync",
    "TaskContext": "dspyrt.runtime.agent",
    "TaskFailed": "dspyrt.agents.api.errors",
    "TaskRun": "dspyrt.agents.api.client",
    "ValidationReport": "dspyrt.agents.assertions.models",
    "connect": "dspyrt.agents.api.client",
    "connect_client": "dspyrt.runtime.client",
    "connect_sync": "dspyrt.agents.api.sync",
    "endpoint": "dspyrt.runtime.agent",
    "on_event": "dspyrt.runtime.agent",
    "program_spec": "dspyrt.agents.api.signatures",
    "task": "dspyrt.runtime.agent",
}

__all__ = [
    "Agent",
    "AssertionResult",
    "Client",
    "CodeQualityValidator",
    "CycleResult",
    "DSPyAssertionFramework",
    "DSPyClient",
    "DSPyOptimizerManager",
    "DspyrtError",
    "EvaluationResult",
    "Event",
    "FourPartOptimizationLoop",
    "HasForward",
    "IntegrationConfig",
    "IntegrationMode",
    "LabeledFewShotOptimizer",
    "LogicValidator",
    "Message",
    "MetricsDashboard",
    "ModelSwitcher",
    "OptimizationResult",
    "PerformanceValidator",
    "ProviderError",
    "RemoteProgram",
    "RetryPolicy",
    "RoleRefinementResult",
    "RoleRefiner",
    "SecurityValidator",
    "SignatureNotSupported",
    "SyncDSPyClient",
    "TaskContext",
    "TaskFailed",
    "TaskRun",
    "ValidationReport",
    "connect",
    "connect_client",
    "connect_sync",
    "endpoint",
    "on_event",
    "program_spec",
    "task",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'dspyrt' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value  # resolve once
    return value


def __dir__() -> list[str]:
    return __all__


if TYPE_CHECKING:
    from dspyrt.agents.api.client import DSPyClient, TaskRun, connect
    from dspyrt.agents.api.errors import ProviderError, SignatureNotSupported, TaskFailed
    from dspyrt.agents.api.remote import RemoteProgram
    from dspyrt.agents.api.signatures import program_spec
    from dspyrt.agents.api.sync import SyncDSPyClient, connect_sync
    from dspyrt.agents.assertions.code_quality import CodeQualityValidator
    from dspyrt.agents.assertions.core import DSPyAssertionFramework
    from dspyrt.agents.assertions.logic import LogicValidator
    from dspyrt.agents.assertions.models import AssertionResult, ValidationReport
    from dspyrt.agents.assertions.performance import PerformanceValidator
    from dspyrt.agents.assertions.security import SecurityValidator
    from dspyrt.agents.dashboard.core import MetricsDashboard
    from dspyrt.agents.loop.core import FourPartOptimizationLoop
    from dspyrt.agents.loop.models import CycleResult, EvaluationResult
    from dspyrt.agents.optimizers.builtin import LabeledFewShotOptimizer
    from dspyrt.agents.optimizers.core import DSPyOptimizerManager
    from dspyrt.agents.optimizers.models import OptimizationResult
    from dspyrt.agents.programs import HasForward
    from dspyrt.agents.roles.models import RoleRefinementResult
    from dspyrt.agents.roles.program import RoleRefiner
    from dspyrt.agents.switcher.core import ModelSwitcher
    from dspyrt.bus.errors import DspyrtError
    from dspyrt.bus.events import Event
    from dspyrt.bus.messages import Message
    from dspyrt.runtime.agent import Agent, RetryPolicy, TaskContext, endpoint, on_event, task
    from dspyrt.runtime.client import Client, connect_client
    from dspyrt.runtime.config import IntegrationConfig, IntegrationMode

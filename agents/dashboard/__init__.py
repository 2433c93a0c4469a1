"""The guide's metrics dashboard: metric series from the event stream, alert management, dashboard views.

    from dspyrt.agents.dashboard import MetricsDashboard, MetricType, SnapshotQuery

    dashboard = MetricsDashboard(rules=load_rules_file(Path("alerts.toml")))
    dashboard.record_cycle_metrics(cycle_result)
    transitions = dashboard.evaluate_alerts()

``dspyrt.agents.dashboard.agent.DashboardAgent`` puts it on the bus (``dashboard`` agent, group ``monitoring``) and
serves the web view; ``dspyrt dashboard`` shows the same data in the terminal.
"""

from dspyrt.agents.dashboard.alerts import (
    Alert,
    AlertManager,
    AlertRule,
    AlertRuleError,
    AlertTransition,
    ErrorRateRule,
    RegressionRule,
    StalenessRule,
    ThresholdRule,
    alert_id,
    load_rules_file,
    parse_rules,
)
from dspyrt.agents.dashboard.core import MetricsDashboard
from dspyrt.agents.dashboard.models import (
    CustomMetricType,
    DashboardSnapshot,
    MetricType,
    MetricTypeInfo,
    SnapshotQuery,
)
from dspyrt.agents.dashboard.series import MetricPoint, MetricSeries

__all__ = [
    "Alert",
    "AlertManager",
    "AlertRule",
    "AlertRuleError",
    "AlertTransition",
    "CustomMetricType",
    "DashboardSnapshot",
    "ErrorRateRule",
    "MetricPoint",
    "MetricSeries",
    "MetricType",
    "MetricTypeInfo",
    "MetricsDashboard",
    "RegressionRule",
    "SnapshotQuery",
    "StalenessRule",
    "ThresholdRule",
    "alert_id",
    "load_rules_file",
    "parse_rules",
]

"""``IntegrationConfig``: the one place configuration is read (``DSPYRT_*`` variables and an optional TOML file)."""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, GetJsonSchemaHandler, SecretStr, ValidationError, field_validator
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from dspyrt.bus import ConfigurationError, ConnectionOptions, StreamLayout, Subjects, TlsOptions
from dspyrt.bus.subjects import check_dotted, check_token, inbox_prefix

CONFIG_FILE_ENV = "DSPYRT_CONFIG"
DEFAULT_CONFIG_FILE = "dspyrt.toml"
DEFAULT_DASHBOARD_HOSTS = ("localhost", "127.0.0.1", "[::1]")
_LABEL = r"[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?"
_HOST_NAME = re.compile(rf"(?:\*\.)?{_LABEL}(?:\.{_LABEL})*")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_OFF = frozenset({"off", "none", "disabled", ""})


def host_pattern(value: str) -> str:
    """One allowed host, normalized: a name (``dashboard.example.com``), ``*.example.com`` (its subdomains), an
    IPv4 address, an IPv6 address in brackets (``[::1]``; the brackets may be left out here) or ``*`` (any:
    only behind a proxy that checks ``Host`` itself). No scheme, no port. ``ValueError`` says what is wrong."""
    text = value.strip().lower().rstrip(".")
    if text == "*":
        return text
    bracketed = text.startswith("[") and text.endswith("]")
    if bracketed or ":" in text:
        try:
            return f"[{ipaddress.IPv6Address(text[1:-1] if bracketed else text).compressed}]"
        except ValueError:
            raise ValueError(f"{value!r}: name a host without a scheme or a port, e.g. dashboard.example.com") from None
    if not _HOST_NAME.fullmatch(text):
        raise ValueError(f"{value!r} is not a host name, an IP address or *.<domain>")
    return text


def env_name(value: str) -> str:
    """The name of an environment variable (letters, digits, ``_``; not starting with a digit)."""
    if not _ENV_NAME.fullmatch(value):
        raise ValueError(f"{value!r} is not an environment variable name (the NAME of the variable, not the token)")
    return value


class IntegrationMode(StrEnum):
    """Which agents a process runs (the guide's IntegrationMode).

    The canonical values are ``full``, ``optimization_only`` and ``monitoring_only``. The guide's names are
    aliases of them: ``IntegrationMode.FULL_INTEGRATION is IntegrationMode.FULL``, and ``"full_integration"``
    (in code, a configuration file or ``DSPYRT_MODE``) reads as ``full``; names are read case-insensitively."""

    FULL = "full"
    OPTIMIZATION_ONLY = "optimization_only"
    MONITORING_ONLY = "monitoring_only"
    FULL_INTEGRATION = "full"  # the guide's name: an alias of FULL

    @classmethod
    def _missing_(cls, value: object) -> IntegrationMode | None:
        # A member's name, aliases included ("full_integration", "FULL"), in any case.
        return cls.__members__.get(value.strip().upper()) if isinstance(value, str) else None

    @classmethod
    def __get_pydantic_json_schema__(cls, schema: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        # pydantic lists every member, aliases included ("full" twice): the schema lists each value once.
        json_schema = handler(schema)
        json_schema["enum"] = [mode.value for mode in cls]
        return json_schema


class IntegrationConfig(BaseSettings):
    """Everything configurable. Environment: ``DSPYRT_<FIELD>``; file: ``dspyrt.toml`` or ``$DSPYRT_CONFIG``."""

    model_config = SettingsConfigDict(env_prefix="DSPYRT_", extra="forbid", validate_default=True)

    mode: IntegrationMode = IntegrationMode.FULL
    enable_optimizers: bool = True
    enable_assertions: bool = True
    enable_metrics: bool = True
    auto_optimize: bool = True
    auto_validate: bool = True

    # Empty: start the embedded nats-server. Several URLs: the servers of one cluster.
    nats_urls: Annotated[list[str], NoDecode] = Field(default_factory=list)
    nats_user: str | None = None
    nats_password: SecretStr | None = None
    nats_token: SecretStr | None = None
    nats_credentials: Path | None = None
    nats_nkey_seed: Path | None = None
    nats_tls_ca: Path | None = None
    nats_tls_cert: Path | None = None
    nats_tls_key: Path | None = None
    # Replies arrive under this prefix; default _INBOX.<nats_user> (or _INBOX without a user), which the deploy's
    # permissions expect. Set it when the user name comes from a credentials file.
    nats_inbox_prefix: str | None = None
    # Embedded server only: the port to try first (a free one is taken if it is busy).
    nats_port: int = Field(default=4222, ge=0, le=65535)

    state_dir: Path = Path(".dspyrt")
    subject_prefix: str = "dspy"
    stream_replicas: int = Field(default=1, ge=1, le=5)
    # Bring existing streams to these settings at start. False: only create missing ones (the deploy's agents,
    # whose NATS users may not change streams; an operator applies changes with `dspyrt streams` as admin).
    manage_streams: bool = True
    # JetStream reserves the event stream's size up front; old events are discarded beyond it.
    event_stream_max_mb: int = Field(default=256, ge=1, le=1_000_000)

    # LM models (TOML, [[models]] tables); unset: only the offline demo model.
    models_file: Path | None = None
    # The switcher's LM response cache, shared by every switcher replica through a KV bucket.
    lm_cache: bool = True
    lm_cache_ttl_hours: float = Field(default=7 * 24, gt=0)
    lm_cache_max_mb: int = Field(default=1024, ge=1, le=1_000_000)
    lm_cache_memory_entries: int = Field(default=10_000, ge=0, le=10_000_000)

    # Clients with their own NATS user go through the gateway agent (the deploy's client users): no JetStream access.
    client_gateway: bool = False
    # Task kinds the gateway accepts from clients (the others are submitted by agents to agents).
    gateway_kinds: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["optimize", "cycle", "evaluate", "refine-role", "wordcount"]
    )

    # Empty: every agent the mode and the enable flags allow.
    agents: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Concurrent requests/tasks one agent instance handles.
    agent_concurrency: int = Field(default=32, ge=1, le=10_000)
    task_ack_wait: float = Field(default=30.0, gt=0)
    task_max_deliver: int = Field(default=5, ge=1, le=1000)
    shutdown_grace: float = Field(default=10.0, ge=0)
    # Each process probes its own NATS connection through the server this often; no echo within the timeout while
    # nats-py says "connected" forces a reconnect (runtime.liveness).
    liveness_interval: float = Field(default=5.0, gt=0, le=3600)
    liveness_timeout: float = Field(default=3.0, gt=0, le=600)
    log_level: str = "INFO"
    # OpenTelemetry instrumentors turned on when installed (by their "opentelemetry_instrumentor" entry-point
    # name). "dspy" is openinference's DSPy instrumentation (the [phoenix] extra): LM, Predict, Module spans.
    instrumentations: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["dspy"])

    # The dashboard agent. Its alert rules: a TOML file of [[rules]] (dspyrt.agents.dashboard.alerts).
    alerts_file: Path | None = None
    # Where the web view listens; beyond loopback only with a token (else no page, and the health check says why).
    dashboard_host: str = "127.0.0.1"
    # Unset: 8765, or a free port when 8765 is taken. Set: that port or no page. 0: any free port. "off": no page.
    dashboard_port: int | None = Field(default=8765, ge=0, le=65535)
    # Names the page answers to in Host (DNS rebinding); the listening address is added.
    dashboard_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: list(DEFAULT_DASHBOARD_HOSTS), min_length=1
    )
    # The NAME of the environment variable holding the page's bearer token, never the token (as api_key_env).
    dashboard_token_env: str | None = None
    dashboard_poll: float = Field(default=2.0, gt=0)  # seconds between the page's refreshes
    dashboard_eval_interval: float = Field(default=1.0, gt=0)  # seconds between alert evaluations
    dashboard_queue_interval: float = Field(default=5.0, gt=0)  # seconds between queue-depth readings
    dashboard_max_points: int = Field(default=2000, ge=10, le=1_000_000)  # points kept per series

    @field_validator("nats_inbox_prefix")
    @classmethod
    def _inbox(cls, value: str | None) -> str | None:
        return check_dotted(value, "inbox prefix") if value is not None else None

    @field_validator("subject_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        return check_token(value, "subject prefix")

    @field_validator("nats_urls", "agents", "instrumentations", "gateway_kinds", "dashboard_hosts", mode="before")
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        if isinstance(value, str):  # DSPYRT_NATS_URLS=nats://a:4222,nats://b:4222
            return [u.strip() for u in value.split(",") if u.strip()]
        return value

    @field_validator("dashboard_port", mode="before")
    @classmethod
    def _port_off(cls, value: Any) -> Any:
        return None if isinstance(value, str) and value.strip().lower() in _OFF else value

    @field_validator("dashboard_hosts")
    @classmethod
    def _hosts(cls, value: list[str]) -> list[str]:
        return [host_pattern(h) for h in value]

    @field_validator("dashboard_token_env", mode="before")
    @classmethod
    def _token_env(cls, value: Any) -> Any:
        if isinstance(value, str):
            return env_name(value.strip()) if value.strip() else None
        return value

    @field_validator("nats_urls")
    @classmethod
    def _url_schemes(cls, value: list[str]) -> list[str]:
        for url in value:
            if not url.startswith(("nats://", "tls://", "ws://", "wss://")):
                raise ValueError(f"{url!r} is not a NATS URL (nats://host:port)")
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = _config_file()
        if path is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)

    # --- derived views: the bus layer's own option types -------------------------------------------

    @property
    def embedded(self) -> bool:
        return not self.nats_urls

    def connection_options(self, servers: list[str] | None = None, name: str = "dspyrt") -> ConnectionOptions:
        tls = None
        if self.nats_tls_ca or self.nats_tls_cert:
            tls = TlsOptions(ca_file=self.nats_tls_ca, cert_file=self.nats_tls_cert, key_file=self.nats_tls_key)
        return ConnectionOptions(
            servers=servers or self.nats_urls,
            name=name,
            user=self.nats_user,
            password=self.nats_password,
            token=self.nats_token,
            credentials_file=self.nats_credentials,
            nkey_seed_file=self.nats_nkey_seed,
            tls=tls,
            inbox_prefix=self.nats_inbox_prefix or inbox_prefix(self.nats_user),
        )

    @property
    def subjects(self) -> Subjects:
        return Subjects(self.subject_prefix)

    @property
    def stream_layout(self) -> StreamLayout:
        return StreamLayout(replicas=self.stream_replicas, event_max_bytes=self.event_stream_max_mb * 1024 * 1024)


def _config_file() -> Path | None:
    explicit = os.environ.get(CONFIG_FILE_ENV)
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise ConfigurationError(f"{CONFIG_FILE_ENV}={explicit}: no such file")
        return path
    default = Path(DEFAULT_CONFIG_FILE)
    return default if default.is_file() else None


def load_config(**overrides: Any) -> IntegrationConfig:
    """Read the configuration; any problem becomes one :class:`ConfigurationError` naming every bad setting."""
    try:
        return IntegrationConfig(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'config'}: {err['msg']}" for err in exc.errors(include_url=False)
        )
        raise ConfigurationError(f"invalid configuration (DSPYRT_* / {DEFAULT_CONFIG_FILE}): {problems}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigurationError(f"invalid configuration file: {exc}") from exc

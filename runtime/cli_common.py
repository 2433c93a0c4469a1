"""What every ``dspyrt`` command shares: its options, its configuration, connecting, and one-line errors.

Errors are one line on stderr, ``error <code>: <message>`` (a validation error lists every field error); the global
``--debug`` option (``options.debug``, set by ``dspyrt.runtime.cli``) prints the traceback too.

Imports only typer, rich and the standard library at module level: NATS (``bus``), the configuration and
telemetry are imported by the functions that use them, so that ``dspyrt --help`` loads none of them.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.markup import escape

from dspyrt.runtime.cli_output import err

if TYPE_CHECKING:
    from dspyrt.bus import DspyrtError
    from dspyrt.runtime.client import Client
    from dspyrt.runtime.config import IntegrationConfig

T = TypeVar("T")

ConfigOption = Annotated[
    Path | None, typer.Option("--config", "-c", help="TOML configuration file (else dspyrt.toml if present)")
]
JsonOption = Annotated[bool, typer.Option("--json", help="machine-readable output")]
WideOption = Annotated[bool, typer.Option("--wide", help="tables at their full width: one line per row, ids whole")]

# Field errors listed in an error line; the rest are counted.
MAX_LISTED_FIELD_ERRORS = 20


@dataclass
class GlobalOptions:
    """The options given before the command (``dspyrt --debug submit ...``)."""

    debug: bool = False


options = GlobalOptions()


# --------------------------------------------------------------------------------------------- errors


def error_line(code: str, message: str, field_errors: Sequence[Any] = ()) -> str:
    """``<code>: <message>``, followed by every field error (``loc: message``), up to MAX_LISTED_FIELD_ERRORS.

    ``field_errors`` are ``FieldError``s or their JSON dicts. A message that names the first field error in
    parentheses at its end (``dspyrt.bus.messages.decode``'s) names it once."""
    listed = [
        f"{fe.get('loc')}: {fe.get('message')}" if isinstance(fe, dict) else f"{fe.loc}: {fe.message}"
        for fe in field_errors
    ]
    if listed:
        first = f" ({listed[0]})"
        if message.endswith(first):
            message = message[: -len(first)]
        more = len(listed) - MAX_LISTED_FIELD_ERRORS
        message += ": " + "; ".join(listed[:MAX_LISTED_FIELD_ERRORS]) + (f"; and {more} more" if more > 0 else "")
    return f"{code}: {message}"


def print_error(code: str, message: str, field_errors: Sequence[Any] = ()) -> None:
    """One line on stderr: ``error <code>: <message>`` (never wrapped, no markup read in it)."""
    err.print(f"[red]error[/red] {escape(error_line(code, message, field_errors))}", soft_wrap=True, highlight=False)


def report(exc: DspyrtError) -> None:
    """A DspyrtError as one line (after its traceback with ``--debug``)."""
    if options.debug:
        traceback.print_exception(exc)
    print_error(exc.code, exc.message, getattr(exc, "field_errors", None) or ())


def fail(error: DspyrtError, exit_code: int = 1) -> typer.Exit:
    """Report ``error`` as one line; the Exit (with ``exit_code``) to raise."""
    report(error)
    return typer.Exit(exit_code)


def dspyrt_error_of(exc: BaseException) -> DspyrtError | None:
    """``exc`` if it is a DspyrtError, or the one inside exception groups of a single exception (task groups')."""
    from dspyrt.bus import DspyrtError

    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc if isinstance(exc, DspyrtError) else None


@contextmanager
def one_line_errors(exit_code: int = 2) -> Iterator[None]:
    """Within the block, a DspyrtError is printed as one line and the command exits with ``exit_code``."""
    try:
        yield
    except Exception as exc:
        error = dspyrt_error_of(exc)
        if error is None:
            raise
        raise fail(error, exit_code) from None


# ------------------------------------------------------------------------------------------- running


def command_config(config_file: Path | None, **overrides: Any) -> IntegrationConfig:
    """The configuration a command runs with (``config_file``, else ``dspyrt.toml`` and ``DSPYRT_*``, with
    ``overrides``); logging set up at its level, on stderr."""
    from dspyrt.runtime.config import CONFIG_FILE_ENV, load_config

    if config_file is not None:
        os.environ[CONFIG_FILE_ENV] = str(config_file)
    cfg = load_config(**overrides)
    logging.basicConfig(
        level=cfg.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    return cfg


def run(fn: Callable[[], Awaitable[T]]) -> T:
    """Run a command body; our errors become one line on stderr and exit code 2."""
    import anyio

    try:
        with one_line_errors():
            return anyio.run(fn)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


@dataclass(frozen=True)
class _Failed:
    error: DspyrtError


def with_client(
    config_file: Path | None,
    body: Callable[[Client], Awaitable[T]],
    *,
    config: IntegrationConfig | None = None,
    failure_exit: int = 2,
    **overrides: Any,
) -> T:
    """Connect (to ``config``, else the configuration loaded from ``config_file`` with ``overrides``) and run
    ``body`` with the client. Our errors are one line: a configuration error or an unreachable NATS exits with code
    2, an error raised by ``body`` with ``failure_exit`` (1 for a command that ran and failed)."""
    from dspyrt.bus import DspyrtError
    from dspyrt.runtime.client import connect_client

    def inner() -> Awaitable[T | _Failed]:
        async def go() -> T | _Failed:
            async with connect_client(cfg, identity=os.environ.get("USER") or "cli") as client:
                try:
                    return await body(client)
                except DspyrtError as exc:
                    return _Failed(exc)

        return go()

    with one_line_errors():
        cfg = config if config is not None else command_config(config_file, **overrides)
    # With a collector configured, a submitted task's trace starts at the submit (`send dspy.task.<kind>`);
    # without one the CLI writes no span files of its own (it may run in any folder), and loads no SDK.
    telemetry = None
    if _otlp_configured():
        from dspyrt.runtime.telemetry import setup_telemetry

        telemetry = setup_telemetry(cfg.state_dir, service_name="dspyrt-cli")
    try:
        outcome = run(inner)
    finally:
        if telemetry is not None:
            telemetry.flush()
    if isinstance(outcome, _Failed):
        raise fail(outcome.error, failure_exit)
    return outcome


def _otlp_configured() -> bool:
    # runtime.telemetry.otlp_configured, without importing the OpenTelemetry SDK to find out that it is not needed.
    if not any(name.startswith("OTEL_EXPORTER_OTLP_") for name in os.environ):
        return False
    from dspyrt.runtime.telemetry import otlp_configured

    return otlp_configured()

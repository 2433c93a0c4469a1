"""``dspyrt lm-cache``: the switcher's LM response cache: what its KV bucket holds, or ``--clear`` to empty it.

The bucket is the one every switcher replica shares (``SwitcherAgent.make_cache``): named by
``Subjects.lm_cache_bucket``, created by ``dspyrt.bus.streams.cache_bucket`` with a TTL and a size limit (the oldest
entries are dropped when it is full), kept in JetStream's stream ``KV_<bucket>``. The facts come from that stream
(``stream_info``); ``--clear`` purges it and records ``lm-cache.clear`` in the audit trail. Each switcher also keeps
an LRU in its own memory in front of the bucket; only a restart empties it, and the command says so.

Under the deploy's permissions (``deploy/nats``) run it as ``admin``: the ``client`` user may not look at the
bucket, and no agent's user may purge it. A refused permission is one line and exit code 2, as any other error.
``dspyrt.runtime.cli`` registers it: ``app.command("lm-cache")(lm_cache_command)``; the work is in
``dspyrt.runtime.cli_lm_cache_report``, imported when the command runs.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated

import typer

from dspyrt.runtime.cli_common import ConfigOption, JsonOption, command_config, one_line_errors, with_client
from dspyrt.runtime.cli_output import console

if TYPE_CHECKING:  # the report's models, NATS and the bus are imported by the command: runtime.cli starts without
    from dspyrt.runtime.cli_lm_cache_report import LmCacheReport
    from dspyrt.runtime.client import Client

ClearOption = Annotated[
    bool,
    typer.Option(
        "--clear",
        help="remove every entry from the shared bucket (running switchers keep their in-memory LRU until restarted)",
    ),
]


def lm_cache_command(clear: ClearOption = False, as_json: JsonOption = False, config_file: ConfigOption = None) -> None:
    """The switcher's LM response cache: its bucket, entries, size, TTL and size limit; --clear empties it."""
    from dspyrt.runtime.cli_lm_cache_report import LmCacheSettings, clear_lm_cache, read_lm_cache, render_report

    with one_line_errors():
        config = command_config(config_file)
    settings = LmCacheSettings.of(config)

    async def body(client: Client) -> LmCacheReport:
        if clear:
            return await clear_lm_cache(client.bus, settings, identity=client.identity)
        return await read_lm_cache(client.bus, settings)

    report = with_client(config_file, body, config=config)
    if as_json:
        console.print_json(json.dumps(report.model_dump(mode="json")))
        return
    console.print(render_report(report))

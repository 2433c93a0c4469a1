"""Asking the model switcher for a model: the one caller of ``<prefix>.switcher.select``.

The LM calls themselves go to the switcher through :mod:`dspyrt.agents.lm.bus_engine` (``complete``).
"""

from __future__ import annotations

from dspyrt.agents.lm.bus_engine import SWITCHER
from dspyrt.agents.switcher.models import Selection, SelectRequest
from dspyrt.runtime.client import Client

SELECT = "select"
SELECT_TIMEOUT = 10.0


async def ask_switcher(client: Client, request: SelectRequest, *, timeout: float = SELECT_TIMEOUT) -> Selection:
    """The switcher's choice for ``request``: the model, why, its fallback chain and, when the request names a
    program, the version of it deployed for that model."""
    return await client.request(SWITCHER, SELECT, request, Selection, timeout=timeout)

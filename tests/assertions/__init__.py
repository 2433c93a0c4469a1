"""Tests of the assertion framework (``dspyrt.agents.assertions``) and its agents (``assertions.agent``)."""

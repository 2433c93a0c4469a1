"""Tests of the assertion framework (``agents.assertions``) and its agents (``agents.validators``)."""

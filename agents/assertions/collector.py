"""The helper every validator gathers its results with: :class:`ResultCollector`."""

from __future__ import annotations

from collections.abc import Mapping

from dspyrt.agents.assertions.models import AssertionResult, AssertionType, Severity


class ResultCollector:
    """Gathers one validator's results: each failure, and one passing result per check that found none.

    A validator calls :meth:`checked` for every value it examines and :meth:`fail` for every problem;
    :meth:`results` lists at most ``limit`` failures per check plus a summary of the rest. ``summaries``
    words the passing result of a check, ``{n}`` standing for the number of values checked.
    """

    def __init__(
        self, assertion_type: AssertionType, *, limit: int = 20, summaries: Mapping[str, str] | None = None
    ) -> None:
        self.type = assertion_type
        self.limit = limit
        self._summaries = dict(summaries or {})
        self._checked: dict[str, int] = {}
        self._passing: dict[str, str] = {}
        self._failures: dict[str, list[AssertionResult]] = {}
        self._extra: dict[str, tuple[int, Severity]] = {}

    def checked(self, check: str, count: int = 1, *, summary: str | None = None) -> None:
        """Note that ``check`` examined ``count`` more values; ``summary`` words its passing result."""
        self._checked[check] = self._checked.get(check, 0) + count
        if summary is not None:
            self._passing[check] = summary

    def fail(
        self,
        check: str,
        message: str,
        *,
        severity: Severity = Severity.ERROR,
        evidence: str | None = None,
        example: int | None = None,
        field: str | None = None,
    ) -> None:
        """Record a failed assertion of ``check``."""
        self._checked.setdefault(check, 0)
        listed = self._failures.setdefault(check, [])
        if len(listed) < self.limit:
            listed.append(
                AssertionResult(
                    type=self.type,
                    check=check,
                    passed=False,
                    severity=severity,
                    message=message,
                    evidence=evidence,
                    example=example,
                    field=field,
                )
            )
            return
        count, worst = self._extra.get(check, (0, severity))
        self._extra[check] = (count + 1, severity if severity.at_least(worst) else worst)

    def results(self) -> list[AssertionResult]:
        """Failures per check (with a summary of those over the limit), and a pass for each clean check."""
        out: list[AssertionResult] = []
        for check, count in self._checked.items():
            failures = self._failures.get(check)
            if failures:
                out.extend(failures)
                extra = self._extra.get(check)
                if extra is not None:
                    out.append(
                        AssertionResult(
                            type=self.type,
                            check=check,
                            passed=False,
                            severity=extra[1],
                            message=f"... and {extra[0]} more {check} failure(s) not listed",
                        )
                    )
                continue
            template = self._summaries.get(check, "{n} value(s) checked, no problem found")
            out.append(
                AssertionResult(
                    type=self.type,
                    check=check,
                    passed=True,
                    severity=Severity.INFO,
                    message=self._passing.get(check) or template.replace("{n}", str(count)),
                )
            )
        return out

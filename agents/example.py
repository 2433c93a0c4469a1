"""The example agent: the smallest real agent, used by ``make run`` until the optimizer agents take over.

It shows the three kinds of handler: an endpoint (``example.echo``), a durable task (``wordcount``) that
reports progress, and nothing DSPy-specific yet.
"""

from __future__ import annotations

from collections import Counter

from pydantic import Field

from dspyrt.bus import Message
from dspyrt.runtime.agent import Agent, TaskContext, endpoint, task
from dspyrt.runtime.config import IntegrationMode


class EchoRequest(Message):
    text: str = Field(max_length=100_000)


class EchoReply(Message):
    text: str
    agent: str


class WordCountInput(Message):
    text: str = Field(min_length=1, max_length=500_000)
    top: int = Field(default=5, ge=1, le=100)


class WordCountResult(Message):
    words: int
    distinct: int
    top: list[tuple[str, int]]


class ExampleAgent(Agent):
    name = "example"
    group = "example"
    modes = frozenset({IntegrationMode.FULL})
    description = "example agent: echo endpoint and wordcount task"

    @endpoint("echo")
    async def echo(self, request: EchoRequest) -> EchoReply:
        """Answer with the same text."""
        return EchoReply(text=request.text, agent=self.name)

    @task("wordcount")
    async def wordcount(self, job: WordCountInput, ctx: TaskContext) -> WordCountResult:
        words = [w.strip(".,;:!?\"'()").lower() for w in job.text.split()]
        words = [w for w in words if w]
        await ctx.progress("counting", step=1, total=1)
        counts = Counter(words)
        return WordCountResult(words=len(words), distinct=len(counts), top=counts.most_common(job.top))

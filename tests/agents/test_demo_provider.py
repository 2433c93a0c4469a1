"""The local OpenAI-compatible demo provider, driven through the real ``dspy.LM("openai/...")`` HTTP path.

No mocks: a real provider process on 127.0.0.1 (``run_demo_provider``), or the server in this test's task
group (``serve``), and DSPy's own engine talking HTTP to it.

What DSPy 3.4.1 raises, observed here. ``dspy.LM("openai/<name>", api_base=..., api_key=...)`` (with or
without ``timeout=``) runs on DSPy's NATIVE lm15 engine (provider ``openai-chat``, ``POST {api_base}/chat/
completions``, user agent ``lm15/stdlib``); litellm is never imported. Every class is in
``dspy.utils.exceptions``; the lm15 error is the ``__cause__``.

    fault                                    DSPy exception            .status  .retry_after  .provider_code / message
    401 (wrong key)                          LMAuthError               401      None          invalid_api_key
    403                                      LMAuthError               403      None          permission_denied
    404 model_not_found                      LMUnsupportedModelError   404      None          model_not_found
    404 other code (wrong api_base path)     LMInvalidRequestError     404      None          unknown_url
    400                                      LMInvalidRequestError     400      None          invalid_request_error
    409 / 413 / 422                          LMInvalidRequestError     same     None          (body's code or type)
    408                                      LMTimeoutError            408      None
    429 + Retry-After: S                     LMRateLimitError          429      S (float)     rate_limit_exceeded
    500 / 502 / 503                          LMServerError             same     None          (body's code)
    504                                      LMTimeoutError            504      None
    refused connection (provider stopped)    LMTransportError          None     None          "failed to connect to ..."
    dropped connection (no response)         LMTransportError          None     None          "server closed connection
                                                                                               before sending response"
    client timeout (dspy.LM(timeout=T) and   LMTransportError          None     None          "read timed out waiting
      provider latency > T)                                                                    for headers" - NOT
                                                                                               LMTimeoutError
The 401 message quotes the key the provider received, verbatim, followed by lm15's own "credential came
from: an explicit api_key (value never shown)" hint. ``request_id`` is the provider's ``x-request-id``.
The retryable ones (``is_retryable_lm_error``): LMRateLimitError, LMTimeoutError, LMServerError,
LMTransportError. With ``num_retries=N`` DSPy makes N+1 attempts (seen with a 429, in a test below).

Under ``engine="litellm"`` (not what DSPy picks here) the statuses map the same, but a dropped connection
is LMServerError with status 500, and litellm's async client leaves unclosed-transport ResourceWarnings.

The first LM call in a process loads DSPy's model metadata, and fetches it from GitHub (a warning when
offline) unless ``LITELLM_LOCAL_MODEL_COST_MAP=True``: hence the fixture that sets it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import anyio
import dspy
import httpx
import pytest
from dspy.utils.exceptions import (
    LMAuthError,
    LMError,
    LMInvalidRequestError,
    LMRateLimitError,
    LMServerError,
    LMTimeoutError,
    LMTransportError,
    LMUnsupportedModelError,
)
from pydantic import ValidationError

import dspyrt.agents.lm.demo_provider as demo_provider
from dspyrt.agents.lm.demo_provider import (
    DemoProviderProcess,
    FaultSchedule,
    FaultSettings,
    Outcome,
    ProviderOptions,
    decide,
    main,
    run_demo_provider,
    serve,
)

pytestmark = pytest.mark.timeout(20)

MODEL = "demo-model"
QUESTION, ANSWER = "What is the capital of France?", "Paris"


@pytest.fixture(autouse=True)
def offline_metadata(monkeypatch: pytest.MonkeyPatch) -> None:
    """DSPy's model metadata from the bundled snapshot, never fetched."""
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")


@pytest.fixture(scope="module")
def shared() -> Iterator[DemoProviderProcess]:
    """One provider process for the module; it serves only ``demo-model``."""
    with run_demo_provider(models=[MODEL]) as provider:
        yield provider


@pytest.fixture
def provider(shared: DemoProviderProcess) -> DemoProviderProcess:
    """The shared provider with no faults and zeroed counters (once no earlier request is still in flight)."""
    shared.control()
    deadline = time.monotonic() + 10
    while shared.stats()["in_flight"] and time.monotonic() < deadline:
        time.sleep(0.02)
    shared.reset()
    return shared


def lm_for(provider: DemoProviderProcess, *, model: str = MODEL, api_key: str | None = None, **options: Any) -> Any:
    options.setdefault("num_retries", 0)
    key = provider.api_key if api_key is None else api_key
    return dspy.LM(f"openai/{model}", api_base=provider.url, api_key=key, cache=False, **options)


def capital_program() -> Any:
    predict = dspy.Predict("question -> answer")
    predict.demos = [dspy.Example(question=QUESTION, answer=ANSWER)]
    return predict


def call_error(lm: Any) -> LMError:
    with pytest.raises(LMError) as caught:
        lm("hi")
    return caught.value


# --- through dspy.LM ------------------------------------------------------------------------------------------


def test_predict_answers_like_the_demo_with_real_usage(provider: DemoProviderProcess) -> None:
    lm = lm_for(provider)
    with dspy.context(lm=lm):
        prediction = capital_program()(question="what is the capital city of France")
    assert prediction.answer == ANSWER

    stats = provider.stats()
    assert (stats["requests"], stats["ok"]) == (1, 1)
    assert stats["prompt_tokens"] > 0 and stats["completion_tokens"] > 0
    usage = lm.history[-1]["usage"]
    assert usage["prompt_tokens"] == stats["prompt_tokens"]
    assert usage["completion_tokens"] == stats["completion_tokens"]
    assert usage["total_tokens"] == stats["prompt_tokens"] + stats["completion_tokens"]
    assert lm.history[-1]["response_model"] == MODEL


def test_json_adapter_answers_parse(provider: DemoProviderProcess) -> None:
    predict = dspy.Predict("question -> answer: int")
    predict.demos = [dspy.Example(question="how many legs does a spider have", answer=8)]
    with dspy.context(lm=lm_for(provider), adapter=dspy.JSONAdapter()):
        assert predict(question="how many legs has a spider").answer == 8


def test_wrong_key_is_an_auth_error_quoting_the_key(provider: DemoProviderProcess) -> None:
    error = call_error(lm_for(provider, api_key="sk-wrong-0123456789"))
    assert type(error) is LMAuthError
    assert error.status == 401
    assert error.provider_code == "invalid_api_key"
    assert "Incorrect API key provided: sk-wrong-0123456789." in error.message
    assert provider.stats()["unauthorized"] == 1


def test_rate_limit_carries_retry_after(provider: DemoProviderProcess) -> None:
    provider.control(rate_limit_rate=1.0, retry_after=0.25)
    error = call_error(lm_for(provider))
    assert type(error) is LMRateLimitError
    assert (error.status, error.retry_after) == (429, 0.25)
    assert error.request_id == "req-demo-1"


def test_default_retry_after(provider: DemoProviderProcess) -> None:
    provider.control(every_nth_429=1)
    error = call_error(lm_for(provider))
    assert type(error) is LMRateLimitError
    assert error.retry_after == FaultSettings().retry_after == 0.05


def test_dspy_retries_a_rate_limit_and_succeeds(provider: DemoProviderProcess) -> None:
    settings = next(
        s
        for s in (FaultSettings(rate_limit_rate=0.5, seed=n) for n in range(1000))
        if outcomes(s, 2) == ["rate_limited", "ok"]
    )
    provider.control(**settings.model_dump())
    assert lm_for(provider, num_retries=1)("hi") == ["unknown"]
    stats = provider.stats()
    assert (stats["requests"], stats["rate_limited"], stats["ok"]) == (2, 1, 1)


def test_server_error(provider: DemoProviderProcess) -> None:
    provider.control(error_rate=1.0)
    error = call_error(lm_for(provider))
    assert type(error) is LMServerError
    assert error.status == 500
    assert provider.stats()["errors"] == 1


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (400, LMInvalidRequestError),
        (401, LMAuthError),
        (403, LMAuthError),
        (404, LMUnsupportedModelError),
        (408, LMTimeoutError),
        (422, LMInvalidRequestError),
        (429, LMRateLimitError),
        (500, LMServerError),
        (502, LMServerError),
        (503, LMServerError),
        (504, LMTimeoutError),
    ],
)
def test_fail_all_status_maps_to_dspy_error(
    provider: DemoProviderProcess, status: int, expected: type[LMError]
) -> None:
    provider.control(fail_all=status)
    error = call_error(lm_for(provider))
    assert type(error) is expected
    assert error.status == status
    assert provider.stats()["fail_all"] == 1


def test_unknown_model_is_unsupported(provider: DemoProviderProcess) -> None:
    error = call_error(lm_for(provider, model="no-such-model"))
    assert type(error) is LMUnsupportedModelError
    assert (error.status, error.provider_code) == (404, "model_not_found")
    assert provider.stats()["unknown_model"] == 1


def test_wrong_api_base_path_is_an_invalid_request(provider: DemoProviderProcess) -> None:
    lm = dspy.LM(f"openai/{MODEL}", api_base=provider.root, api_key=provider.api_key, cache=False, num_retries=0)
    error = call_error(lm)
    assert type(error) is LMInvalidRequestError
    assert (error.status, error.provider_code) == (404, "unknown_url")


def test_dropped_connection_is_a_transport_error(provider: DemoProviderProcess) -> None:
    provider.control(drop_rate=1.0)
    error = call_error(lm_for(provider))
    assert type(error) is LMTransportError
    assert error.status is None
    assert "closed connection" in error.message
    assert provider.stats()["dropped"] == 1


def test_client_timeout_is_a_transport_error(provider: DemoProviderProcess) -> None:
    provider.control(latency=1.0)
    error = call_error(lm_for(provider, timeout=0.1))
    assert type(error) is LMTransportError
    assert error.status is None
    assert "timed out" in error.message


def test_stopped_provider_refuses_connections() -> None:
    with run_demo_provider() as provider:
        lm = lm_for(provider)
        assert lm("hi") == ["unknown"]
        provider.stop()
        assert provider.process.returncode == 0  # SIGTERM is a clean exit
        provider.stop()
        error = call_error(lm)
    assert type(error) is LMTransportError
    assert error.status is None
    assert "failed to connect" in error.message


async def test_64_concurrent_acalls_all_succeed(provider: DemoProviderProcess) -> None:
    provider.control(latency=0.2)
    lm = lm_for(provider)
    answers: list[Any] = []

    async def one(index: int) -> None:
        answers.append(await lm.acall(f"question {index}"))

    with anyio.fail_after(15):
        async with anyio.create_task_group() as tg:
            for index in range(64):
                tg.start_soon(one, index)
    assert answers == [["unknown"]] * 64
    stats = provider.stats()
    assert (stats["requests"], stats["ok"]) == (64, 64)
    assert stats["max_in_flight"] > 1  # the provider overlaps requests: nothing blocks its event loop


# --- faults: determinism --------------------------------------------------------------------------------------


def outcomes(settings: FaultSettings, count: int) -> list[Outcome]:
    schedule = FaultSchedule(settings)
    return [schedule.next().outcome for _ in range(count)]


def observed(lm: Any) -> Outcome:
    try:
        lm("hi")
    except LMRateLimitError:
        return "rate_limited"
    except LMServerError:
        return "error"
    except LMTransportError:
        return "dropped"
    return "ok"


def test_same_seed_same_outcomes(provider: DemoProviderProcess) -> None:
    settings = FaultSettings(rate_limit_rate=0.2, error_rate=0.2, drop_rate=0.2, seed=11)
    expected = outcomes(settings, 50)
    assert set(expected) == {"ok", "rate_limited", "error", "dropped"}
    assert outcomes(FaultSettings(**{**settings.model_dump(), "seed": 12}), 50) != expected

    lm = lm_for(provider)
    provider.control(**settings.model_dump())
    assert [observed(lm) for _ in range(50)] == expected
    provider.control(**settings.model_dump())  # a restarted schedule replays the sequence
    assert [observed(lm) for _ in range(50)] == expected
    stats = provider.stats()
    assert stats["requests"] == 100
    assert stats["ok"] == 2 * expected.count("ok")


def test_every_nth_schedule() -> None:
    settings = FaultSettings(every_nth_429=3, every_nth_500=2)
    assert outcomes(settings, 6) == ["ok", "error", "rate_limited", "error", "ok", "rate_limited"]
    assert decide(FaultSettings(fail_all=503, every_nth_429=1), 1, 0.99) == "fail_all"
    assert decide(FaultSettings(rate_limit_rate=0.1, error_rate=0.1, drop_rate=0.1), 1, 0.25) == "dropped"
    assert decide(FaultSettings(rate_limit_rate=0.1, error_rate=0.1, drop_rate=0.1), 1, 0.31) == "ok"


def test_every_nth_over_http(provider: DemoProviderProcess) -> None:
    provider.control(every_nth_429=3)
    lm = lm_for(provider)
    assert [observed(lm) for _ in range(6)] == ["ok", "ok", "rate_limited", "ok", "ok", "rate_limited"]


def test_settings_are_validated_before_anything_starts() -> None:
    with pytest.raises(ValidationError):
        FaultSettings(error_rate=0.6, rate_limit_rate=0.6)
    with pytest.raises(ValidationError):
        with run_demo_provider(drop_rate=2):
            pass
    with pytest.raises(SystemExit) as exited:
        main(["--api-key", "k", "--fail-all", "200"])
    assert exited.value.code == 2


def test_control_validates_and_reports(provider: DemoProviderProcess) -> None:
    assert provider.control(latency=0.5, seed=3) == {**FaultSettings().model_dump(), "latency": 0.5, "seed": 3}
    refused = httpx.post(provider.root + "/control", json={"drop_rate": 5}, timeout=10)
    assert refused.status_code == 400
    assert provider.stats()["requests"] == 0


# --- the wire, in-process -------------------------------------------------------------------------------------


def chat_body(model: str = MODEL, **extra: Any) -> dict[str, Any]:
    messages = [
        {
            "role": "system",
            "content": "Your input fields are:\n1. `question` (str):\nYour output fields are:\n1. `answer` (str):",
        },
        {"role": "user", "content": [{"type": "text", "text": f"[[ ## question ## ]]\n{QUESTION}"}]},
        {"role": "assistant", "content": f"[[ ## answer ## ]]\n{ANSWER}\n\n[[ ## completed ## ]]"},
        {"role": "user", "content": "[[ ## question ## ]]\nthe capital of France?"},
    ]
    return {"model": model, "messages": messages, **extra}


async def test_wire_contract_in_process() -> None:
    options = ProviderOptions(api_key="sk-in-process")
    async with anyio.create_task_group() as tg:
        port = await tg.start(serve, options)
        headers = {"authorization": "Bearer sk-in-process"}
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers=headers, timeout=10) as client:
            answer = await client.post("/v1/chat/completions", json=chat_body("any-model"))
            assert answer.status_code == 200
            body = answer.json()
            assert body["object"] == "chat.completion" and body["model"] == "any-model"
            assert body["choices"][0]["message"]["content"] == f"[[ ## answer ## ]]\n{ANSWER}\n\n[[ ## completed ## ]]"
            assert body["choices"][0]["finish_reason"] == "stop"
            usage = body["usage"]
            assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0

            async def chunks() -> Any:
                yield b'{"model": "m", "messages": '
                yield b'[{"role": "user", "content": "hi"}]}'

            assert (await client.post("/v1/chat/completions", content=chunks())).status_code == 200

            streamed = await client.post("/v1/chat/completions", json=chat_body(stream=True))
            assert streamed.status_code == 400
            assert streamed.json()["error"]["type"] == "invalid_request_error"

            models = await client.get("/v1/models")
            assert [m["id"] for m in models.json()["data"]] == [demo_provider.DEFAULT_MODEL]
            assert (await client.get("/v1/models", headers={"authorization": "Bearer x"})).status_code == 401
            assert (await client.get("/nowhere")).status_code == 404
            assert (await client.get("/v1/chat/completions")).status_code == 405
            assert (await client.post("/v1/chat/completions", content=b"{not json")).status_code == 400

            await client.post("/control", json={"drop_rate": 1.0})
            with pytest.raises(httpx.RemoteProtocolError):
                await client.post("/v1/chat/completions", json=chat_body())
            await client.post("/control", json={"fail_all": 429, "retry_after": 1.5})
            limited = await client.post("/v1/chat/completions", json=chat_body())
            assert (limited.status_code, limited.headers["retry-after"]) == (429, "1.5")
            assert limited.json()["error"]["type"] == "rate_limit_error"

            stats = (await client.get("/stats")).json()
            assert stats["requests"] == 6
            assert (stats["ok"], stats["bad_requests"], stats["dropped"], stats["fail_all"]) == (2, 2, 1, 1)
            assert (await client.post("/reset")).json()["requests"] == 0
        tg.cancel_scope.cancel()


def test_public_api() -> None:
    assert demo_provider.__all__ == sorted(demo_provider.__all__)
    assert demo_provider.__all__ == [
        "DEFAULT_MODEL",
        "Decision",
        "DemoProvider",
        "DemoProviderProcess",
        "FaultSchedule",
        "FaultSettings",
        "HttpReply",
        "HttpRequest",
        "Outcome",
        "ProviderOptions",
        "ProviderStats",
        "decide",
        "main",
        "run_demo_provider",
        "serve",
    ]

"""OpenAI-compatible backend: retries against a local fake server, then a real `vllm serve`."""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from pydantic import ValidationError

from avr_core.config import ExecutionConfig, OpenAIModel, parse_model_spec
from avr_core.engines import load_generator, load_reward_model
from avr_core.engines.base import EngineError, Generator, RewardModel, token_usage
from avr_core.engines.openai_backend import (
    OpenAIGenerator,
    OpenAIRewardModel,
    RetryPolicy,
    build_chat_payload,
    server_root,
    split_completion_tokens,
)
from avr_core.schemas import Conversation, Message, Sampling
from avr_core.settings import AvrSettings

FAST_RETRY = RetryPolicy(max_retries=3, base_s=0.01, max_s=0.05)


class FakeServer:
    """A scripted HTTP server: the first `failures` requests get `fail_status`, then real answers."""

    def __init__(self, failures: int = 0, fail_status: int = 503) -> None:
        self.failures = failures
        self.fail_status = fail_status
        self.requests: list[tuple[str, dict]] = []
        self.authorizations: list[str | None] = []
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def answer(self, path: str, body: dict, authorization: str | None) -> tuple[int, dict]:
        """Deterministic answers derived from the request so tests can check order."""
        with self._lock:
            self.requests.append((path, body))
            self.authorizations.append(authorization)
            if len(self.requests) <= self.failures:
                return self.fail_status, {"error": "temporarily overloaded"}
        last = body["messages"][-1]["content"]
        if path == "/v1/chat/completions":
            if body["model"] == "unknown":
                return 404, {"error": {"message": "The model `unknown` does not exist."}}
            # Reversed index order checks that the client sorts choices by index.
            choices = [
                {"index": i, "message": {"role": "assistant", "content": f"{last}#{i}"}}
                for i in reversed(range(body["n"]))
            ]
            # Usage as vLLM reports it: per request, the completion tokens of all choices.
            usage = {"prompt_tokens": len(last.split()), "completion_tokens": 3 * body["n"]}
            return 200, {"choices": choices, "usage": usage}
        if path == "/classify":
            return 200, {"data": [{"index": 0, "probs": [float(len(last))], "num_classes": 1}]}
        return 404, {"error": f"no route {path}"}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                length = int(self.headers["Content-Length"])
                body = json.loads(self.rfile.read(length))
                status, payload = server.answer(self.path, body, self.headers["Authorization"])
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:
                pass

        return Handler

    def __enter__(self) -> FakeServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


@pytest.fixture
def fake_server() -> Iterator[FakeServer]:
    with FakeServer(failures=2) as server:
        yield server


def _chat(text: str) -> Conversation:
    return [Message(role="user", content=text)]


def _spec(base_url: str, model: str = "tiny") -> OpenAIModel:
    return OpenAIModel(path=model, base_url=base_url)


def test_chat_retries_503_then_succeeds_in_input_order(fake_server: FakeServer) -> None:
    # Annotated with the protocol: a type checker verifies the engine implements it.
    generator: Generator = OpenAIGenerator(
        _spec(fake_server.base_url), ExecutionConfig(max_concurrency=4), retry=FAST_RETRY
    )
    assert generator.model_id == "openai:tiny"
    prompts = [f"prompt {i}" for i in range(6)]
    outputs = generator.chat([_chat(p) for p in prompts], Sampling(n=3, max_tokens=5, seed=7))
    generator.close()
    assert outputs == [[f"{p}#{i}" for i in range(3)] for p in prompts]
    # Two 503s, then one successful request per conversation.
    assert len(fake_server.requests) == 2 + len(prompts)
    path, body = fake_server.requests[-1]
    assert path == "/v1/chat/completions"
    assert {body["n"], body["max_tokens"], body["seed"], body["model"]} == {3, 5, 7, "tiny"}


def test_chat_carries_the_servers_token_usage(fake_server: FakeServer) -> None:
    generator = OpenAIGenerator(_spec(fake_server.base_url), ExecutionConfig(), retry=FAST_RETRY)
    (one,), (two, three) = generator.chat(
        [_chat("three word prompt")], Sampling(n=1)
    ) + generator.chat([_chat("hi")], Sampling(n=2))
    generator.close()
    assert token_usage(one) == (3, 3)  # one choice: the request's counts, exactly
    # Two choices share the request's 6 completion tokens by their characters ("hi#0", "hi#1").
    assert token_usage(two) == (1, 3) and token_usage(three) == (1, 3)


def test_completion_tokens_split_over_choices_keeps_the_total() -> None:
    assert split_completion_tokens(10, ["a", "bbb", "c"]) == [2, 6, 2]
    assert sum(split_completion_tokens(7, ["ab", "abc", ""])) == 7
    assert split_completion_tokens(4, ["", ""]) == [2, 2]
    assert split_completion_tokens(5, ["only"]) == [5]


def test_classify_retries_then_returns_raw_scores(fake_server: FakeServer) -> None:
    reward: RewardModel = OpenAIRewardModel(
        _spec(fake_server.base_url), ExecutionConfig(max_concurrency=2), retry=FAST_RETRY
    )
    assert reward.model_id == "openai:tiny"
    scores = reward.score([_chat("ab"), _chat("abcd"), _chat("a")])
    reward.close()
    assert scores == [2.0, 4.0, 1.0]
    assert all(body["use_activation"] is False for _, body in fake_server.requests)
    assert {path for path, _ in fake_server.requests} == {"/classify"}


def test_gives_up_after_max_retries_naming_the_status() -> None:
    with FakeServer(failures=100, fail_status=502) as server:
        retry = RetryPolicy(max_retries=2, base_s=0.01)
        generator = OpenAIGenerator(_spec(server.base_url), ExecutionConfig(), retry=retry)
        with pytest.raises(EngineError, match=r"after 2 retries.*HTTP 502"):
            generator.chat([_chat("x")], Sampling())
        assert len(server.requests) == 3  # first try + 2 retries


def test_client_error_is_not_retried_and_carries_the_body() -> None:
    with FakeServer(failures=0) as server:
        generator = OpenAIGenerator(
            _spec(server.base_url, model="unknown"), ExecutionConfig(), retry=FAST_RETRY
        )
        with pytest.raises(EngineError, match=r"conversation 0.*HTTP 404.*does not exist"):
            generator.chat([_chat("x")], Sampling())
        assert len(server.requests) == 1


def test_connection_refused_is_retried_then_fails() -> None:
    with FakeServer() as server:
        url = server.base_url  # the port is free again once the server stops
    generator = OpenAIGenerator(
        _spec(url), ExecutionConfig(), retry=RetryPolicy(max_retries=1, base_s=0.01)
    )
    with pytest.raises(EngineError, match=r"after 1 retries.*ConnectError"):
        generator.chat([_chat("x")], Sampling())


def test_missing_base_url_fails_when_the_spec_is_validated() -> None:
    # Before any engine exists: a config file or flow form without base_url is rejected up front.
    with pytest.raises(ValidationError, match=r"base_url\s+Field required"):
        OpenAIModel(path="m")  # type: ignore[call-arg]
    with pytest.raises(ValidationError, match=r"openai\.base_url\s+Field required"):
        parse_model_spec({"backend": "openai", "path": "m"})
    with pytest.raises(ValidationError, match="base_url"):
        OpenAIModel(path="m", base_url="")


def test_api_key_is_sent_as_bearer_token_only_when_given(
    fake_server: FakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_server.failures = 0
    spec = _spec(fake_server.base_url)
    direct = OpenAIGenerator(spec, ExecutionConfig(), api_key="sk-direct")
    direct.chat([_chat("a")], Sampling())
    direct.close()
    # The factory takes the key from the settings object built at the edge, not from os.environ.
    monkeypatch.setenv("AVR_OPENAI_API_KEY", "sk-from-env-must-not-leak")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-env-must-not-leak")
    settings = AvrSettings(AVR_OPENAI_API_KEY="sk-settings")
    reward = load_reward_model(spec, settings=settings)
    reward.score([_chat("b")])
    reward.close()
    generator = load_generator(spec)
    generator.chat([_chat("c")], Sampling())
    generator.close()
    assert fake_server.authorizations == ["Bearer sk-direct", "Bearer sk-settings", None]


def test_backoff_grows_and_is_capped() -> None:
    policy = RetryPolicy(max_retries=10, base_s=1.0, max_s=8.0)
    delays = [policy.delay_s(k) for k in range(6)]
    assert 0.8 <= delays[0] <= 1.2 and 3.2 <= delays[2] <= 4.8
    assert all(d <= 8.0 * 1.2 for d in delays)


def test_payload_and_root_helpers() -> None:
    payload = build_chat_payload("m", _chat("hi"), Sampling(n=2, seed=None))
    assert "seed" not in payload and payload["messages"] == [{"role": "user", "content": "hi"}]
    assert server_root("http://h:8000/v1/") == "http://h:8000"
    assert server_root("http://h:8000") == "http://h:8000"


# --- a real `vllm serve` (second environment, see scripts/setup_vllm_env.sh) ---


@pytest.mark.vllm
@pytest.mark.slow
def test_generate_through_vllm_serve(vllm_server) -> None:
    # The seed reaching the server is checked on the wire against the fake server above. Equal
    # samples from two seeded calls are not asserted here: vLLM does not promise them across
    # calls (prefix-cache hits and batch shapes change the CPU kernels' rounding, and CI saw a
    # sample differ in its seventh token twice), so such a check only measures vLLM's numerics.
    generator = OpenAIGenerator(
        _spec(vllm_server.base_url, model=vllm_server.generator_name), ExecutionConfig()
    )
    conversations = [_chat("Name a colour."), _chat("Say hello in French.")]
    outputs = generator.chat(conversations, Sampling(n=2, max_tokens=8, seed=3))
    generator.close()
    assert [len(samples) for samples in outputs] == [2, 2]
    assert all(text.strip() for samples in outputs for text in samples)


@pytest.mark.vllm
@pytest.mark.slow
def test_score_through_vllm_serve_matches_transformers(vllm_server, reward_reference) -> None:
    reward = OpenAIRewardModel(
        _spec(vllm_server.reward_base_url, model=vllm_server.reward_name), ExecutionConfig()
    )
    scores = reward.score(reward_reference.conversations)
    reward.close()
    for got, want in zip(scores, reward_reference.scores, strict=True):
        assert math.isclose(got, want, rel_tol=1e-2, abs_tol=1e-2), (got, want)

"""Engines that talk to an existing OpenAI-compatible server (for example `vllm serve`).

Generation uses `POST {base_url}/chat/completions` with `n` samples per request, so the server
shares each prompt's prefix across its samples. Reward models use vLLM's `POST /classify`
endpoint of a `vllm serve --runner pooling` server, with the activation switched off so the score
is the raw Bradley-Terry logit, the same number the transformers backend returns.

Requests run in a bounded thread pool (`ExecutionConfig.max_concurrency`); connection errors,
timeouts, 429 and 5xx answers are retried with exponential backoff (`max_retries`); any other
answer raises `EngineError` with the server's body in the message. The bearer token is passed in
by the caller (`AvrSettings.api_key()` at the edge); this module never reads the environment.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import httpx

from avr_core.config import ExecutionConfig, OpenAIModel
from avr_core.engines.base import Completion, EngineError, messages_as_dicts
from avr_core.schemas import Constraint, Conversation, Message, Sampling

__all__ = [
    "OpenAIGenerator",
    "OpenAIRewardModel",
    "RetryPolicy",
    "build_chat_payload",
    "build_classify_payload",
    "parse_chat_choices",
    "split_completion_tokens",
    "parse_classify_scores",
    "server_root",
]

_T = TypeVar("_T")
_R = TypeVar("_R")
# Statuses worth another try: the server is overloaded, restarting or rate limiting.
_RETRYABLE_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
_BODY_IN_ERROR_CHARS = 2000


class RetryPolicy:
    """Exponential backoff with jitter: attempt k waits base * 2**k seconds, capped at `max_s`."""

    def __init__(self, max_retries: int, base_s: float = 0.5, max_s: float = 30.0) -> None:
        self.max_retries = max_retries
        self.base_s = base_s
        self.max_s = max_s

    def delay_s(self, attempt: int) -> float:
        """Seconds to wait before retry number `attempt` (0-based)."""
        # Jitter keeps many workers that failed together from retrying in lockstep.
        delay: float = min(self.max_s, self.base_s * 2**attempt) * random.uniform(0.8, 1.2)
        return delay


def server_root(base_url: str) -> str:
    """The server's root URL: vLLM serves `/classify` beside `/v1`, not under it."""
    root = base_url.rstrip("/")
    return root.removesuffix("/v1")


def build_chat_payload(
    model: str, conversation: Sequence[Message], sampling: Sampling
) -> dict[str, Any]:
    """The JSON body of one chat-completions request asking for `sampling.n` samples."""
    payload: dict[str, Any] = {
        "model": model,
        "messages": messages_as_dicts(conversation),
        "n": sampling.n,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "max_tokens": sampling.max_tokens,
    }
    if sampling.seed is not None:
        payload["seed"] = sampling.seed
    return payload


def parse_chat_choices(body: Any, n: int, where: str) -> list[str]:
    """The `n` completion texts of a chat-completions answer, in choice-index order."""
    choices = body.get("choices") if isinstance(body, dict) else None
    if not isinstance(choices, list) or len(choices) != n:
        got = len(choices) if isinstance(choices, list) else "no"
        raise EngineError(f"{where}: expected {n} choices, got {got}: {str(body)[:500]}")
    ordered = sorted(choices, key=lambda choice: choice.get("index", 0))
    texts = []
    for choice in ordered:
        message = choice.get("message") or {}
        # A null content means the model produced nothing usable; keep the row, text is empty.
        texts.append(message.get("content") or "")
    usage = body.get("usage")
    if not isinstance(usage, dict):
        return texts  # a server that reports no usage: tokens unknown
    prompt_tokens = int(usage.get("prompt_tokens") or 0)
    completions = split_completion_tokens(int(usage.get("completion_tokens") or 0), texts)
    return [
        Completion(text, prompt_tokens, tokens)
        for text, tokens in zip(texts, completions, strict=True)
    ]


def split_completion_tokens(total: int, texts: Sequence[str]) -> list[int]:
    """A request's completion tokens over its `n` choices. The API reports one total per request,
    so with n > 1 each choice gets a share proportional to its characters (the sum stays exact;
    one choice, the common case, gets the exact count)."""
    chars = [len(text) for text in texts]
    if not texts:
        return []
    if sum(chars) == 0:
        chars = [1] * len(texts)
    shares = [total * c // sum(chars) for c in chars]
    shares[-1] += total - sum(shares)
    return shares


def build_classify_payload(model: str, conversation: Sequence[Message]) -> dict[str, Any]:
    """The JSON body of one vLLM `/classify` request returning the raw logit of a chat."""
    return {
        "model": model,
        "messages": messages_as_dicts(conversation),
        # vLLM applies sigmoid/softmax by default; a Bradley-Terry score is the raw logit.
        "use_activation": False,
    }


def parse_classify_scores(body: Any, where: str) -> float:
    """The single raw score of a `/classify` answer for a one-label reward model."""
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, list) or len(data) != 1:
        raise EngineError(f"{where}: expected one classification, got {str(body)[:500]}")
    probs = data[0].get("probs")
    if not isinstance(probs, list) or len(probs) != 1:
        raise EngineError(
            f"{where}: a reward model must have exactly one label, got scores {probs!r}"
        )
    return float(probs[0])


def _run_bounded(func: Callable[[_T], _R], items: Sequence[_T], max_concurrency: int) -> list[_R]:
    """`func` over `items` with at most `max_concurrency` in flight; results in input order."""
    if len(items) <= 1 or max_concurrency == 1:
        return [func(item) for item in items]
    with ThreadPoolExecutor(max_workers=min(max_concurrency, len(items))) as pool:
        # map re-raises the first failure in input order once every request has finished.
        return list(pool.map(func, items))


class _Client:
    """A thread-safe JSON POST client with retries: the part both engines share."""

    def __init__(
        self,
        base_url: str,
        execution: ExecutionConfig,
        retry: RetryPolicy,
        api_key: str | None = None,
    ) -> None:
        headers = {}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._http = httpx.Client(
            timeout=execution.request_timeout_s,
            headers=headers,
            limits=httpx.Limits(max_connections=execution.max_concurrency),
        )
        self.base_url = base_url.rstrip("/")
        self.retry = retry

    def post_json(self, url: str, payload: dict[str, Any], where: str) -> Any:
        """POST `payload`, retrying transient failures; the decoded JSON answer or `EngineError`."""
        last_problem = ""
        for attempt in range(self.retry.max_retries + 1):
            if attempt:
                time.sleep(self.retry.delay_s(attempt - 1))
            try:
                response = self._http.post(url, json=payload)
            except httpx.TransportError as err:  # connection refused/reset, timeouts
                last_problem = f"{type(err).__name__}: {err}"
                continue
            if response.status_code in _RETRYABLE_STATUSES:
                last_problem = (
                    f"HTTP {response.status_code}: {response.text[:_BODY_IN_ERROR_CHARS]}"
                )
                continue
            if response.status_code >= 400:
                raise EngineError(
                    f"{where}: POST {url} failed with HTTP {response.status_code}: "
                    f"{response.text[:_BODY_IN_ERROR_CHARS]}"
                )
            try:
                return response.json()
            except ValueError as err:
                raise EngineError(
                    f"{where}: POST {url} answered non-JSON: {response.text[:500]}"
                ) from err
        raise EngineError(
            f"{where}: POST {url} still failing after {self.retry.max_retries} retries; "
            f"last error {last_problem}"
        )

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()


class _Endpoint:
    """What both OpenAI-compatible engines hold: the served model's name and a retrying client."""

    def __init__(
        self,
        spec: OpenAIModel,
        execution: ExecutionConfig,
        api_key: str | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        self.model_id = spec.model_id
        self._model = spec.path
        self._max_concurrency = execution.max_concurrency
        self._client = _Client(
            spec.base_url, execution, retry or RetryPolicy(execution.max_retries), api_key
        )

    def close(self) -> None:
        """Close the HTTP connections; the server keeps running."""
        self._client.close()


class OpenAIGenerator(_Endpoint):
    """`Generator` over an OpenAI-compatible chat-completions endpoint."""

    def __init__(
        self,
        spec: OpenAIModel,
        execution: ExecutionConfig,
        api_key: str | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        super().__init__(spec, execution, api_key, retry)
        self._url = f"{self._client.base_url}/chat/completions"

    def chat(self, conversations: list[Conversation], sampling: Sampling) -> list[list[str]]:
        """`sampling.n` completions per conversation, in input order."""

        def complete(indexed: tuple[int, Conversation]) -> list[str]:
            index, conversation = indexed
            where = f"{self.model_id} conversation {index}"
            payload = build_chat_payload(self._model, conversation, sampling)
            body = self._client.post_json(self._url, payload, where)
            return parse_chat_choices(body, sampling.n, where)

        return _run_bounded(complete, list(enumerate(conversations)), self._max_concurrency)


class OpenAIRewardModel(_Endpoint):
    """`RewardModel` over vLLM's `/classify` endpoint (server started with `--runner pooling`).

    `base_url` may be given with or without the `/v1` suffix: `/classify` lives at the root.
    """

    def __init__(
        self,
        spec: OpenAIModel,
        execution: ExecutionConfig,
        api_key: str | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        super().__init__(spec, execution, api_key, retry)
        self._url = f"{server_root(self._client.base_url)}/classify"

    def score(
        self,
        conversations: list[Conversation],
        constraints: list[list[Constraint]] | None = None,
    ) -> list[float]:
        """One raw reward per conversation, in input order (`constraints` are ignored)."""

        def classify(indexed: tuple[int, Conversation]) -> float:
            index, conversation = indexed
            where = f"{self.model_id} conversation {index}"
            payload = build_classify_payload(self._model, conversation)
            body = self._client.post_json(self._url, payload, where)
            return parse_classify_scores(body, where)

        return _run_bounded(classify, list(enumerate(conversations)), self._max_concurrency)

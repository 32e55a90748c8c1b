"""Engine protocols (DESIGN section 3): every synthesis step talks to these two interfaces."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from avr_core.schemas import Constraint, Conversation, Message, Sampling

__all__ = [
    "Completion",
    "EngineError",
    "Generator",
    "RewardModel",
    "messages_as_dicts",
    "token_usage",
]


class Completion(str):
    """A generated text that also carries its token counts, as the engine reported them.

    A `str` so that every caller that only wants the text is unchanged; the counts survive only
    until the text is transformed (`.strip()` returns a plain `str`), so synthesis code reads them
    with `token_usage` where it takes the engine's output. `prompt_tokens` counts the rendered
    conversation (chat template included) the text answers; `completion_tokens` the generated
    tokens, the stop token included (what vLLM and OpenAI-compatible servers bill).
    """

    prompt_tokens: int
    completion_tokens: int

    def __new__(cls, text: str, prompt_tokens: int, completion_tokens: int) -> Completion:
        completion = super().__new__(cls, text)
        completion.prompt_tokens = prompt_tokens
        completion.completion_tokens = completion_tokens
        return completion

    def __reduce__(self) -> tuple[type[Completion], tuple[str, int, int]]:
        # Pickled across process boundaries (the vLLM engine's worker) with its counts.
        return (Completion, (str(self), self.prompt_tokens, self.completion_tokens))


def token_usage(text: str) -> tuple[int, int] | None:
    """`(prompt_tokens, completion_tokens)` of an engine's output, None when the engine that
    wrote it reported none (a scripted test engine)."""
    if isinstance(text, Completion):
        return text.prompt_tokens, text.completion_tokens
    return None


class Generator(Protocol):
    """Chat generation: one list of `sampling.n` completions per input conversation, in order.

    Real backends return `Completion`s (texts with token counts); any `str` is accepted, its
    tokens then count as unknown."""

    model_id: str

    def chat(self, conversations: list[Conversation], sampling: Sampling) -> list[list[str]]: ...

    def close(self) -> None:
        """Free the model (GPU memory) explicitly; the engine is unusable afterwards."""
        ...


class RewardModel(Protocol):
    """Scores whole conversations (prompt + final assistant turn); higher is better.

    `constraints`, when given, holds one list per conversation: the verifiable-rules backend scores
    against them and learned reward models ignore them.
    """

    model_id: str

    def score(
        self,
        conversations: list[Conversation],
        constraints: list[list[Constraint]] | None = None,
    ) -> list[float]: ...

    def close(self) -> None: ...


class EngineError(RuntimeError):
    """An engine failed on a batch; the caller fails only the shard it was working on."""


def messages_as_dicts(conversation: Sequence[Message]) -> list[dict[str, str]]:
    """A conversation as the `[{"role": ..., "content": ...}]` list chat templates and APIs take."""
    return [{"role": m.role, "content": m.content} for m in conversation]

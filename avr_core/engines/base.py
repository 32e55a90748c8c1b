"""Engine protocols (DESIGN section 3): every synthesis step talks to these two interfaces."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from avr_core.schemas import Constraint, Conversation, Message, Sampling

__all__ = ["EngineError", "Generator", "RewardModel", "messages_as_dicts"]


class Generator(Protocol):
    """Chat generation: one list of `sampling.n` completions per input conversation, in order."""

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

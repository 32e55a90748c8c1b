"""A reward model made of verifiable rules: no weights, exact and reproducible scores.

The score of a conversation is the fraction of its prompt's constraints that the last assistant
message satisfies (avr_core.constraints), minus `length_penalty * words / 1000` so that, among
equally compliant answers, the shorter one wins (a guard against the length drift that refinement
otherwise rewards). A prompt without constraints therefore scores 1.0 minus the penalty.
"""

from __future__ import annotations

from avr_core.config import ExecutionConfig, RulesModel
from avr_core.constraints import count_words, score_constraints, validate_constraints
from avr_core.schemas import Constraint, Conversation

__all__ = ["RulesRewardModel", "last_assistant_message"]


def last_assistant_message(conversation: Conversation, where: str = "conversation") -> str:
    """Content of the last assistant turn: the response the rules judge."""
    for message in reversed(conversation):
        if message.role == "assistant":
            return message.content
    raise ValueError(f"{where} has no assistant message to score")


class RulesRewardModel:
    """RewardModel over verifiable constraints; `length_penalty` trades compliance for length."""

    def __init__(self, spec: RulesModel, execution: ExecutionConfig | None = None) -> None:
        self.model_id = spec.model_id
        self.length_penalty = spec.length_penalty

    def score(
        self,
        conversations: list[Conversation],
        constraints: list[list[Constraint]] | None = None,
    ) -> list[float]:
        """One score per conversation: fraction of constraints met minus the length penalty."""
        if constraints is None:
            raise ValueError(
                "the rules reward model needs constraints: pass one list per conversation "
                "(the prompts' `constraints` field)"
            )
        if len(constraints) != len(conversations):
            raise ValueError(
                f"got {len(conversations)} conversations but {len(constraints)} constraint lists"
            )
        scores = []
        for i, (conversation, rules) in enumerate(zip(conversations, constraints, strict=True)):
            response = last_assistant_message(conversation, f"conversation {i}")
            checked = validate_constraints(rules, f"conversation {i} constraints")
            compliance = score_constraints(response, checked)
            scores.append(compliance - self.length_penalty * count_words(response) / 1000)
        return scores

    def close(self) -> None:
        """Nothing to free: the rules hold no model."""

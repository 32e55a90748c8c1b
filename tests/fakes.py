"""Scripted engines for tests: the one home of fake generators and reward models.

Like distilabel's `DummyLLM`, these are small real implementations of the engine protocols of
`avr_core.engines.base` (`model_id`, `chat` / `score`, `close`), not mocks: they answer
deterministically from the conversations they get and record every call so a test can assert
how the code under test batched its work.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import NamedTuple

from avr_core.engines.base import EngineError
from avr_core.schemas import Constraint, Conversation, Sampling
from avr_core.templates import Templates, judge_request, load_templates, refine_request

__all__ = [
    "EngineCall",
    "LengthReward",
    "RecordingGenerator",
    "ScriptedGenerator",
    "conversation_level",
    "prompt_text",
    "shrinking_drafts",
]


def conversation_level(conversation: Conversation, templates: Templates | None = None) -> str:
    """Which synthesis level a conversation belongs to, from its shape.

    "critique" ends with the judge request, "refine" with the refine request, anything else is
    a prompt to "answer".
    """
    templates = templates or load_templates()
    if conversation[-1] == judge_request(templates):
        return "critique"
    if conversation[-1] == refine_request(templates):
        return "refine"
    return "answer"


def prompt_text(conversation: Conversation) -> str:
    """The prompt a conversation grew from: the content of its first user turn."""
    return next(m.content for m in conversation if m.role == "user")


class ScriptedGenerator:
    """Answers by level; `critique_text(question, attempt)` decides what a critique says.

    Records `(levels of the conversations, sampling)` per call. Answers are
    `"answer to {question}"`, refinements `"refined {question} via {critique!r} #{k}"`.
    """

    model_id = "fake:scripted"

    def __init__(
        self,
        critique_text: Callable[[str, int], str] | None = None,
        templates: Templates | None = None,
    ) -> None:
        self.templates = templates or load_templates()
        self.calls: list[tuple[list[str], Sampling]] = []
        self.outputs: list[list[list[str]]] = []
        self.critique_attempts: dict[str, int] = {}
        self.critique_text = critique_text or (lambda question, attempt: "fine [[7]]")
        self.closed = False

    def chat(self, conversations: list[Conversation], sampling: Sampling) -> list[list[str]]:
        levels = [conversation_level(c, self.templates) for c in conversations]
        self.calls.append((levels, sampling))
        outputs = []
        for conversation, level in zip(conversations, levels, strict=True):
            question = conversation[0].content
            samples = []
            for k in range(sampling.n):
                if level == "answer":
                    samples.append(f"answer to {question}")
                elif level == "critique":
                    attempt = self.critique_attempts.get(question, 0)
                    self.critique_attempts[question] = attempt + 1
                    samples.append(self.critique_text(question, attempt))
                else:
                    critique = conversation[-2].content
                    samples.append(f"refined {question} via {critique!r} #{k}")
            outputs.append(samples)
        self.outputs.append(outputs)
        return outputs

    @property
    def generated_chars(self) -> int:
        """Characters of every string this generator has returned."""
        return sum(len(s) for call in self.outputs for samples in call for s in samples)

    def close(self) -> None:
        self.closed = True


def shrinking_drafts(conversation: Conversation, k: int) -> str:
    """Sample `k` for a conversation: the longer the conversation, the shorter the text.

    Refinements (long conversations) therefore beat answers under a length penalty.
    """
    return f"Draft {len(conversation)} words {k} " + "word " * max(1, 40 - 4 * len(conversation))


class EngineCall(NamedTuple):
    """One `chat` call seen by a `RecordingGenerator`: which engine load, which prompts."""

    attempt: int
    prompts: frozenset[str]


class RecordingGenerator:
    """Records the prompts of every call; fails any call that touches a prompt in `failing`.

    A prompt is the first user turn of a conversation (`prompt_text`), so answer, critique and
    refine requests grown from one prompt all count as that prompt. A call that includes a
    failing prompt raises `EngineError`, as a lost device would, and still counts as a call.
    `failing` is a set the test may change between attempts. Several generators (one per engine
    load, `attempt` telling them apart) may share one `calls` list.
    """

    def __init__(
        self,
        failing: Iterable[str] = (),
        *,
        calls: list[EngineCall] | None = None,
        attempt: int = 0,
        respond: Callable[[Conversation, int], str] = shrinking_drafts,
        model_id: str = "fake:recording",
    ) -> None:
        self.failing: set[str] = set(failing)
        self.calls: list[EngineCall] = [] if calls is None else calls
        self.samplings: list[Sampling] = []
        self.attempt = attempt
        self.respond = respond
        self.model_id = model_id
        self.closed = False

    def chat(self, conversations: list[Conversation], sampling: Sampling) -> list[list[str]]:
        if self.closed:
            raise EngineError(f"{self.model_id}: chat after close")
        prompts = frozenset(prompt_text(c) for c in conversations)
        self.calls.append(EngineCall(self.attempt, prompts))
        self.samplings.append(sampling)
        hit = sorted(prompts & self.failing)
        if hit:
            raise EngineError(f"injected failure on {hit[0]!r}: device lost")
        return [[self.respond(c, k) for k in range(sampling.n)] for c in conversations]

    @property
    def prompts_seen(self) -> set[str]:
        """Every prompt that reached this generator (or another sharing its `calls`)."""
        return {p for call in self.calls for p in call.prompts}

    def close(self) -> None:
        self.closed = True


class LengthReward:
    """Score = number of characters of the last turn; records `(conversations, constraints)`."""

    model_id = "fake:length"

    def __init__(self) -> None:
        self.calls: list[tuple[list[Conversation], list[list[Constraint]] | None]] = []
        self.closed = False

    def score(
        self,
        conversations: list[Conversation],
        constraints: list[list[Constraint]] | None = None,
    ) -> list[float]:
        self.calls.append((conversations, constraints))
        return [float(len(c[-1].content)) for c in conversations]

    def close(self) -> None:
        self.closed = True

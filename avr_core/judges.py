"""Judges for evaluation (DESIGN section 9): per-prompt preferences of a candidate over a baseline.

A preference p in [0, 1] says how much the candidate beats the baseline on one prompt (1 = win,
0.5 = tie, 0 = loss); `avr_core.evaluation` turns them into win rates with CIs.

- Reward-model judge: p = 1 / 0.5 / 0 as the candidate's score is above / equal to / below the
  baseline's, both scored in the prompt's context; an unscored side gives no preference (None).
- Pairwise LLM judge (any Generator): every pair is judged twice with the positions swapped; the
  verdict is read from a fixed `[[A]]` / `[[B]]` / `[[C]]` (tie) ending. p = the mean of the games
  that parsed; a prompt where neither parsed has no preference (None) and is counted, never
  dropped silently. Position consistency = the share of prompts whose two parsed games agree once
  the swap is undone.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import jinja2
from pydantic import BaseModel, Field

from avr_core.engines.base import Generator, RewardModel
from avr_core.schemas import Constraint, Conversation, Message, Sampling
from avr_core.synthesis import SynthesisStats, chat_checked, score_checked
from avr_core.templates import BUNDLED_TEMPLATE_DIR

__all__ = [
    "PAIRWISE_TEMPLATE",
    "JudgeTemplate",
    "PairwiseJudgement",
    "Verdict",
    "pairwise_preferences",
    "load_judge_template",
    "parse_verdict",
    "render_request",
    "reward_preferences",
]

# Kept apart from the synthesis templates (judge, refine, trajectory): their version is part of
# every Stage I/II fingerprint, and an evaluation prompt must not invalidate finished data.
PAIRWISE_TEMPLATE = BUNDLED_TEMPLATE_DIR / "eval" / "pairwise.jinja"
Verdict = Literal["A", "B", "tie"]
_VERDICT = re.compile(r"\[\[\s*([ABC])\s*\]\]")


def parse_verdict(text: str) -> Verdict | None:
    """The last `[[A]]`, `[[B]]` or `[[C]]` (tie) in a judge's reply; None if there is none."""
    found = _VERDICT.findall(text)
    if not found:
        return None
    last = found[-1]
    return "tie" if last == "C" else last


def reward_preferences(
    reward: RewardModel,
    prompts: list[Conversation],
    candidates: list[str],
    baselines: list[str],
    constraints: list[list[Constraint]] | None = None,
) -> tuple[list[float | None], list[float | None], list[float | None]]:
    """Score both sides of every prompt in one reward call: (preferences, candidate scores,
    baseline scores); NaN scores (a failed call) count as missing."""
    if not len(prompts) == len(candidates) == len(baselines):
        raise ValueError("prompts, candidates and baselines must have one entry per prompt")
    conversations = [
        [*prompt, Message(role="assistant", content=answer)]
        for answers in (candidates, baselines)
        for prompt, answer in zip(prompts, answers, strict=True)
    ]
    rules = None if constraints is None else [*constraints, *constraints]
    scores = score_checked(reward, conversations, rules)
    clean = [None if math.isnan(s) else s for s in scores]
    ours, theirs = clean[: len(prompts)], clean[len(prompts) :]
    preferences: list[float | None] = []
    for a, b in zip(ours, theirs, strict=True):
        if a is None or b is None:
            preferences.append(None)
        else:
            preferences.append(1.0 if a > b else 0.5 if a == b else 0.0)
    return preferences, ours, theirs


@dataclass(frozen=True)
class JudgeTemplate:
    """The pairwise judge prompt (variables `request`, `answer_a`, `answer_b`) and its version."""

    path: Path
    version: str
    _template: jinja2.Template = field(repr=False, compare=False)

    def render(self, request: str, answer_a: str, answer_b: str) -> str:
        text: str = self._template.render(request=request, answer_a=answer_a, answer_b=answer_b)
        return text.strip()


def load_judge_template(path: str | Path | None = None) -> JudgeTemplate:
    """The pairwise judge template at `path` (default: the bundled one), checked to render."""
    file = Path(path).expanduser().resolve() if path is not None else PAIRWISE_TEMPLATE
    if not file.is_file():
        raise FileNotFoundError(f"judge template {file} does not exist")
    source = file.read_text(encoding="utf-8")
    environment = jinja2.Environment(undefined=jinja2.StrictUndefined, autoescape=False)
    try:
        template = environment.from_string(source)
        template.render(request="", answer_a="", answer_b="")
    except jinja2.TemplateError as err:
        raise ValueError(f"judge template {file}: {err}") from err
    version = hashlib.sha256(source.encode("utf-8")).hexdigest()[:12]
    return JudgeTemplate(file, version, template)


def render_request(prompt: Conversation) -> str:
    """The conversation the answers reply to, as plain text for the judge prompt."""
    if len(prompt) == 1:
        return prompt[0].content
    return "\n\n".join(f"{m.role}: {m.content}" for m in prompt)


class PairwiseJudgement(BaseModel):
    """One prompt judged twice: the candidate as A, then as B."""

    preference: float | None = Field(description="mean of the parsed games; None if neither")
    verdicts: tuple[Verdict | None, Verdict | None] = Field(
        description="raw verdicts of game 1 (candidate = A) and game 2 (candidate = B)"
    )
    replies: tuple[str, str]
    consistent: bool | None = Field(
        description="both games parsed and agree once the swap is undone (None: not both parsed)"
    )


def _candidate_score(verdict: Verdict | None, candidate_is_a: bool) -> float | None:
    if verdict is None:
        return None
    if verdict == "tie":
        return 0.5
    return 1.0 if (verdict == "A") == candidate_is_a else 0.0


def pairwise_preferences(
    judge: Generator,
    prompts: list[Conversation],
    candidates: list[str],
    baselines: list[str],
    template: JudgeTemplate,
    sampling: Sampling,
) -> list[PairwiseJudgement]:
    """Judge every pair in both orders, in one engine call for all games."""
    if not len(prompts) == len(candidates) == len(baselines):
        raise ValueError("prompts, candidates and baselines must have one entry per prompt")
    if not prompts:
        return []
    games: list[Conversation] = []
    for prompt, candidate, baseline in zip(prompts, candidates, baselines, strict=True):
        request = render_request(prompt)
        for a, b in ((candidate, baseline), (baseline, candidate)):
            text = template.render(request, a, b)
            games.append([Message(role="user", content=text)])
    replies = chat_checked(
        judge, games, sampling.model_copy(update={"n": 1}), SynthesisStats(), "pairwise judge"
    )
    judgements = []
    for i in range(len(prompts)):
        first, second = replies[2 * i][0], replies[2 * i + 1][0]
        v1, v2 = parse_verdict(first), parse_verdict(second)
        s1, s2 = _candidate_score(v1, True), _candidate_score(v2, False)
        parsed = [s for s in (s1, s2) if s is not None]
        judgements.append(
            PairwiseJudgement(
                preference=sum(parsed) / len(parsed) if parsed else None,
                verdicts=(v1, v2),
                replies=(first, second),
                consistent=None if s1 is None or s2 is None else s1 == s2,
            )
        )
    return judgements

"""What a run will cost before it runs: engine calls, generated texts and tokens per step, time.

Pure arithmetic over the config (DESIGN sections 4-6): a step generates a known number of texts
per prompt (a tree: 1 answer + x critiques + x*y refinements; a search round: x + x*y; k long
responses; two texts per refinement round) of at most `max_tokens` tokens each. That bound is all
one knows before a run. Once a step has run (the run itself, or a preview of a few prompts), its
step record says what it really generated: tokens per text (most texts stop well before
`max_tokens`), texts per planned text (format retries add texts, a search that stops early
removes some) and tokens per second. `calibrate` turns such a record into a `Calibration` and the
estimate then uses it; it says which figures are bounds and which are calibrated.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel, Field

from avr_core.reporting import text_table

__all__ = [
    "Calibration",
    "GenerationStep",
    "RunEstimate",
    "StepEstimate",
    "calibrate",
    "estimate_run",
    "estimate_step",
    "format_estimate",
    "planned_work",
]

StepKind = Literal["trees", "search", "long_responses", "answers", "refine", "think"]


class GenerationStep(BaseModel):
    """A step that calls a generator, as the estimate sees it: its kind and the numbers of its
    section of the config that decide how much it generates."""

    step: str = Field(description="stage/step, e.g. stage1/seed_trees")
    kind: StepKind
    model: str = Field(description="which generator: a model path or a role")
    max_tokens: int = Field(ge=1, description="the sampling's max_tokens")
    x: int = 1
    y: int = 1
    rounds: int = Field(1, description="search: max_rounds; refine: rounds")
    k: int = 1
    starts_from_policy: bool = Field(True, description="search: the policy writes the start")


class Calibration(BaseModel):
    """What an earlier run of a step really generated, relative to its bound."""

    source: str = Field(description="the run and step measured")
    prompts: int
    tokens_per_text: float
    texts_per_planned: float = Field(description="generated texts / planned texts")
    tokens_per_second: float | None = None


class StepEstimate(BaseModel):
    step: str
    model: str
    prompts: int
    shards: int
    engine_calls: int = Field(description="generation calls, at least (retries add calls)")
    texts: int = Field(description="generated texts planned (a search: if every round improves)")
    bound_tokens: int = Field(description="texts x max_tokens: the most it can generate")
    completion_tokens: int = Field(description="expected generated tokens")
    calibration: Calibration | None = None
    seconds: float = Field(description="expected generation time at the throughput used")
    tokens_per_second: float


class RunEstimate(BaseModel):
    flow: str
    prompts: int
    shards: int
    steps: list[StepEstimate]
    notes: list[str] = Field(default_factory=list)

    @property
    def completion_tokens(self) -> int:
        return sum(step.completion_tokens for step in self.steps)

    @property
    def seconds(self) -> float:
        return sum(step.seconds for step in self.steps)


def planned_work(step: GenerationStep, prompts: int, shards: int) -> tuple[int, int]:
    """(engine calls, generated texts) of a step over `prompts` prompts in `shards` shards, when
    nothing is retried and (for a search) every round improves, so the search never stops early.

    Each level of a shard is one engine call over all its prompts (DESIGN section 3)."""
    if step.kind == "trees":
        return 3 * shards, prompts * (1 + step.x + step.x * step.y)
    if step.kind == "search":
        starts = prompts if step.starts_from_policy else 0
        calls = shards * (2 * step.rounds + (1 if step.starts_from_policy else 0))
        return calls, starts + prompts * step.rounds * (step.x + step.x * step.y)
    if step.kind == "long_responses":
        return shards, prompts * step.k
    if step.kind == "refine":
        return 2 * step.rounds * shards, 2 * step.rounds * prompts
    return shards, prompts  # answers, think: one text per prompt


def calibrate(step: GenerationStep, source: str, result: Mapping[str, Any]) -> Calibration | None:
    """A calibration from a step's record (`StepResult` as JSON: its rows, one per prompt for
    every generating step, its counts and seconds); None when it counted no tokens."""
    counts = result.get("counts") or {}
    texts, tokens = counts.get("generated_texts"), counts.get("completion_tokens")
    prompts = result.get("rows")
    if not (isinstance(texts, int) and isinstance(tokens, int) and texts > 0):
        return None
    if not isinstance(prompts, int) or prompts < 1:
        return None
    planned = planned_work(step, prompts, 1)[1]
    compute = (result.get("seconds") or {}).get("compute")
    speed = tokens / compute if isinstance(compute, int | float) and compute > 0 else None
    return Calibration(
        source=source,
        prompts=prompts,
        tokens_per_text=tokens / texts,
        texts_per_planned=texts / planned,
        tokens_per_second=speed,
    )


def estimate_step(
    step: GenerationStep,
    prompts: int,
    shard_size: int,
    tokens_per_second: float,
    calibration: Calibration | None = None,
) -> StepEstimate:
    """The step's calls, texts and tokens; calibrated when a calibration is given, else the
    bound (every text `max_tokens` long). Time at the calibration's measured speed if it has
    one, else at `tokens_per_second`."""
    shards = math.ceil(prompts / shard_size)
    calls, texts = planned_work(step, prompts, shards)
    bound = texts * step.max_tokens
    expected = bound
    speed = tokens_per_second
    if calibration is not None:
        expected = round(texts * calibration.texts_per_planned * calibration.tokens_per_text)
        speed = calibration.tokens_per_second or tokens_per_second
    return StepEstimate(
        step=step.step,
        model=step.model,
        prompts=prompts,
        shards=shards,
        engine_calls=calls,
        texts=texts,
        bound_tokens=bound,
        completion_tokens=expected,
        calibration=calibration,
        seconds=expected / speed,
        tokens_per_second=speed,
    )


def estimate_run(
    flow: str,
    steps: Sequence[GenerationStep],
    prompts: int,
    shard_size: int,
    tokens_per_second: float,
    calibrations: Mapping[str, Calibration] | None = None,
    notes: Sequence[str] = (),
) -> RunEstimate:
    """Every generating step of a flow over `prompts` prompts."""
    calibrations = calibrations or {}
    return RunEstimate(
        flow=flow,
        prompts=prompts,
        shards=math.ceil(prompts / shard_size),
        steps=[
            estimate_step(s, prompts, shard_size, tokens_per_second, calibrations.get(s.step))
            for s in steps
        ],
        notes=list(notes),
    )


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def format_estimate(estimate: RunEstimate) -> str:
    """The estimate as a console table, then what each figure rests on."""
    rows = [
        (
            s.step,
            s.model,
            str(s.shards),
            str(s.engine_calls),
            f"{s.texts:,}",
            f"{s.completion_tokens:,}",
            f"{s.bound_tokens:,}",
            f"{s.tokens_per_second:,.0f}",
            _duration(s.seconds),
            "measured" if s.calibration else "bound",
        )
        for s in estimate.steps
    ]
    rows.append(
        (
            "all steps",
            "",
            "",
            str(sum(s.engine_calls for s in estimate.steps)),
            f"{sum(s.texts for s in estimate.steps):,}",
            f"{estimate.completion_tokens:,}",
            f"{sum(s.bound_tokens for s in estimate.steps):,}",
            "",
            _duration(estimate.seconds),
            "",
        )
    )
    header = (
        "step",
        "model",
        "shards",
        "engine calls",
        "texts",
        "expected tokens",
        "at most",
        "tokens/s",
        "time",
        "length",
    )
    lines = [
        f"{estimate.flow}: {estimate.prompts} prompts in {estimate.shards} shards",
        text_table(rows, header),
    ]
    for s in estimate.steps:
        c = s.calibration
        if c is not None:
            lines.append(
                f"  {s.step}: calibrated on {c.source} ({c.prompts} prompts): "
                f"{c.tokens_per_text:.1f} tokens per text, {c.texts_per_planned:.2f} texts per "
                "planned text"
                + (f", {c.tokens_per_second:.1f} tokens/s" if c.tokens_per_second else "")
            )
    lines += [f"  {note}" for note in estimate.notes]
    return "\n".join(lines)

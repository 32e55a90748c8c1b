"""Dated versions of a dataset that keeps changing (the nightly `regenerate` flow).

Each version is a self-contained run `runs/{dataset}-{YYYYMMDD}`; `versions/{dataset}/latest.json`
points at the newest. A prompt's scored tree is reused only from the latest earlier version made
with the same `scored_trees_key` (policy, reward model, templates, tree settings): a changed
prompt has a new prompt_id and is regenerated, a removed prompt drops out, and a config change
regenerates everything.
"""

from __future__ import annotations

import re
from datetime import datetime
from zoneinfo import ZoneInfo

from pydantic import BaseModel, Field

from avr_core.layout import RunLayout, StepRef
from avr_core.schemas import PromptRecord, RefinementTree
from avr_core.steps import STAGE1
from avr_core.storage import DatasetStore

__all__ = [
    "PublishedVersion",
    "RegenerateSteps",
    "RegenerationPlan",
    "previous_version",
    "split_new_prompts",
    "today",
    "version_run_name",
]


class RegenerateSteps:
    """Steps of one regenerated version."""

    SOURCE = StepRef("inputs", "source")  # today's whole prompt set
    NEW_PROMPTS = StepRef("inputs", "prompts")  # prompts no earlier version has trees for
    NEW_TREES = StepRef(STAGE1, "seed_trees")
    NEW_SCORED = StepRef(STAGE1, "new_scored")
    SCORED = StepRef(STAGE1, "seed_scored")  # new scored trees + reused ones
    RSFT = StepRef(STAGE1, "rsft")
    PAIRS = StepRef(STAGE1, "pairs")


class RegenerationPlan(BaseModel):
    """What today's version generates and what it reuses."""

    previous: str | None = Field(description="the run reused from, if any")
    prompts: int
    reused: int
    new: int
    trees_key: str = Field(description="scored_trees_key of this version's settings")


class PublishedVersion(BaseModel):
    """The record of a published version (runs/{run}/regenerate.json and versions/...)."""

    dataset: str
    version: str
    run: str
    plan: RegenerationPlan
    datasets: dict[str, dict[str, str | int]] = Field(description="step -> uri, rows, fingerprint")
    complete: bool = True
    published_at: str


def version_run_name(dataset: str, version: str) -> str:
    """Run directory of one dated version: {dataset}-{YYYYMMDD}."""
    return f"{dataset}-{version}"


def today(timezone: str) -> str:
    """Today's date in `timezone` as YYYYMMDD."""
    return datetime.now(ZoneInfo(timezone)).strftime("%Y%m%d")


def previous_version(store: DatasetStore, dataset: str, before: str, trees_key: str) -> str | None:
    """The latest finished version of `dataset` older than `before` made with `trees_key`."""
    pattern = re.compile(rf"^{re.escape(dataset)}-(\d{{8}})$")
    candidates = sorted(
        (match.group(1), run)
        for run in store.list_runs()
        if (match := pattern.match(run)) and match.group(1) < before
    )
    for _, run in reversed(candidates):
        record = store.read_json(RunLayout(run).regenerate_record) or {}
        if record.get("complete") and record.get("plan", {}).get("trees_key") == trees_key:
            return run
    return None


def split_new_prompts(
    prompts: list[PromptRecord], reusable: list[RefinementTree]
) -> tuple[list[PromptRecord], list[RefinementTree]]:
    """Today's prompts without a reusable tree, and the reusable trees of today's prompts."""
    wanted = {p.prompt_id for p in prompts}
    reused = [tree for tree in reusable if tree.prompt_id in wanted]
    have = {tree.prompt_id for tree in reused}
    return [p for p in prompts if p.prompt_id not in have], reused

"""Where everything lives under a storage root (DESIGN section 2). No other module builds a path.

    runs/{run}/run.json                                the run record (config, code version)
    runs/{run}/_lease.json                             who writes the run now (one writer per run)
    runs/{run}/{stage}/{step}/part-{i:05d}.parquet     shards
    runs/{run}/{stage}/{step}/_manifest.json           written last
    runs/{run}/{stage}/{step}/_plan.json               written first: how many shards it will have
    runs/{run}/{stage}/rejects.jsonl                   prompt rows that failed validation
    runs/{run}/_records/{stage}/{step}.json            one small record per finished step
    runs/{run}/checkpoints/{train_step}/...            trainer checkpoints, final/, markers
    runs/{run}/reports/{name}/...                      an evaluation's summary, plots, exports
    runs/{run}/regenerate.json                         a regenerated version's record
    versions/{dataset}/{version}.json, latest.json     published versions of a dataset

Paths are relative to the root; `RootFS.uri` turns them into URIs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NamedTuple

__all__ = [
    "CARD_CONFIG_NAME",
    "CARD_NAME",
    "CHECKPOINTS",
    "COMPLETE_MARKER",
    "FINAL_DIR_NAME",
    "JOB_MARKER",
    "MANIFEST_NAME",
    "PLAN_NAME",
    "RECORDS",
    "REPORTS",
    "RUNS",
    "RUN_REPORT_NAME",
    "RunLayout",
    "StepRef",
    "check_name",
    "shard_name",
    "version_record_path",
]

MANIFEST_NAME = "_manifest.json"
PLAN_NAME = "_plan.json"
FINAL_DIR_NAME = "final"
COMPLETE_MARKER = "_complete.json"
JOB_MARKER = "_job.json"
CHECKPOINTS = "checkpoints"
RECORDS = "_records"
REPORTS = "reports"
CARD_NAME = "README.md"
CARD_CONFIG_NAME = "_config.yaml"
RUN_REPORT_NAME = "report.html"
SHARD_NAME = re.compile(r"^part-(\d{5})\.parquet$")


class StepRef(NamedTuple):
    """A dataset step of a run: `runs/{run}/{stage}/{step}`."""

    stage: str
    step: str

    def __str__(self) -> str:
        return f"{self.stage}/{self.step}"


def check_name(kind: str, value: str) -> str:
    """Reject run/stage/step names that would escape or split the layout."""
    if not value or "/" in value or "\\" in value or value in (".", ".."):
        raise ValueError(f"{kind} must be a non-empty name without '/', got {value!r}")
    return value


def shard_name(index: int) -> str:
    """File name of shard `index` (`part-00003.parquet`)."""
    if not 0 <= index <= 99999:
        raise ValueError(f"shard index must be in 0..99999, got {index}")
    return f"part-{index:05d}.parquet"


def shard_index(name: str) -> int | None:
    """The index in a shard file name, or None for any other file."""
    match = SHARD_NAME.match(name)
    return int(match.group(1)) if match else None


def version_record_path(dataset: str, version: str) -> str:
    """versions/{dataset}/{version}.json (`version="latest"` for the pointer)."""
    return f"versions/{check_name('dataset', dataset)}/{check_name('version', version)}.json"


RUNS = "runs"


@dataclass(frozen=True)
class RunLayout:
    """Every location of one run, relative to the storage root."""

    run: str

    def __post_init__(self) -> None:
        check_name("run", self.run)

    @property
    def directory(self) -> str:
        return f"{RUNS}/{self.run}"

    @property
    def run_record(self) -> str:
        return f"{self.directory}/run.json"

    @property
    def lease(self) -> str:
        return f"{self.directory}/_lease.json"

    @property
    def regenerate_record(self) -> str:
        return f"{self.directory}/regenerate.json"

    def step(self, ref: StepRef) -> str:
        return f"{self.directory}/{check_name('stage', ref[0])}/{check_name('step', ref[1])}"

    def shard(self, ref: StepRef, index: int) -> str:
        return f"{self.step(ref)}/{shard_name(index)}"

    def manifest(self, ref: StepRef) -> str:
        return f"{self.step(ref)}/{MANIFEST_NAME}"

    def step_plan(self, ref: StepRef) -> str:
        """What a step running now will hold (its shard count), so a partial step reads k/n."""
        return f"{self.step(ref)}/{PLAN_NAME}"

    def step_record(self, ref: StepRef) -> str:
        return f"{self.directory}/{RECORDS}/{ref[0]}/{ref[1]}.json"

    def rejects(self, ref: StepRef) -> str:
        """Rejected input rows of an ingest step: beside its step directory, not inside."""
        return f"{self.directory}/{check_name('stage', ref[0])}/rejects.jsonl"

    @property
    def reports(self) -> str:
        """runs/{run}/reports: every evaluation's directory (not a stage)."""
        return f"{self.directory}/{REPORTS}"

    def report(self, name: str, file: str = "") -> str:
        """runs/{run}/reports/{name}/{file}: an evaluation's summary, plots and exports."""
        base = f"{self.reports}/{check_name('report', name)}"
        return f"{base}/{file}" if file else base

    @property
    def run_report(self) -> str:
        """runs/{run}/report.html: the run's page (`avr report`); a file, so never a stage."""
        return f"{self.directory}/{RUN_REPORT_NAME}"

    def step_card(self, ref: StepRef) -> str:
        """The dataset card (Hugging Face README.md) beside a sealed step's shards."""
        return f"{self.step(ref)}/{CARD_NAME}"

    def step_config(self, ref: StepRef) -> str:
        """The parameters of the flow that sealed a step, as a config file, beside its card."""
        return f"{self.step(ref)}/{CARD_CONFIG_NAME}"

    def checkpoints(self, train_step: str) -> str:
        return f"{self.directory}/{CHECKPOINTS}/{check_name('train_step', train_step)}"

    def checkpoint(self, train_step: str, global_step: int) -> str:
        return f"{self.checkpoints(train_step)}/checkpoint-{global_step}"

    def final_model(self, train_step: str) -> str:
        return f"{self.checkpoints(train_step)}/{FINAL_DIR_NAME}"

    def complete_marker(self, train_step: str) -> str:
        return f"{self.checkpoints(train_step)}/{COMPLETE_MARKER}"

    def job_marker(self, train_step: str) -> str:
        return f"{self.checkpoints(train_step)}/{JOB_MARKER}"

"""Evaluation tasks: judge systems against a baseline (a sharded, resumable step of Judgement rows),
then the report: summary with CIs, PNG plots, AlpacaEval JSON per system, a markdown artifact.
"""

from __future__ import annotations

import re
from collections import defaultdict

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, Field

from avr_core.comparison import SystemAnswers, judge_prompts, system_answers
from avr_core.config import EvaluationConfig, ExecutionConfig, ModelSpec, SystemRef
from avr_core.devices import sharing_gpu_memory
from avr_core.evaluation import (
    SUMMARY_HEADER,
    Estimate,
    SystemSummary,
    alpaca_eval_rows,
    mean_estimate,
    summarize_judgements,
    summary_rows,
)
from avr_core.fingerprint import model_identity
from avr_core.ingest import read_answers, source_sha256
from avr_core.judges import JudgeTemplate, load_judge_template, render_request
from avr_core.layout import RunLayout, StepRef
from avr_core.plots import scaling_curve_png, win_rate_png
from avr_core.reporting import ShardStats, markdown_table, text_table
from avr_core.results import StepResult
from avr_core.schemas import RECORD_TYPES, Judgement
from avr_core.steps import ShardOutput, StepIO, plan_step, require_manifest, split_into_shards
from avr_core.storage import DatasetStore
from tasks.engines import LazyEngine, open_generator, open_reward_model, open_store, settings
from tasks.runlog import artifact_key
from tasks.step_runner import execute_plan
from tasks.trees import revision_of

__all__ = [
    "EvaluationReport",
    "evaluate_task",
    "evaluation_step",
    "format_report",
    "render_report_markdown",
    "report_task",
]

_ROUND = re.compile(r"^(.*)@round(\d+)$")


class EvaluationReport(BaseModel):
    """Where an evaluation's outputs are, and its summaries."""

    table_uri: str
    summary_uri: str
    plots: dict[str, str] = Field(default_factory=dict)
    alpaca_eval: dict[str, str] = Field(default_factory=dict)
    summaries: list[SystemSummary] = Field(default_factory=list)


def _load_system(
    store: DatasetStore, run: str, ref: SystemRef, storage_options: dict[str, object]
) -> tuple[list[SystemAnswers], dict[str, object]]:
    """A system's answers and what identifies them (for the fingerprint)."""
    if ref.answers is not None:
        read = read_answers(ref.answers, storage_options=dict(storage_options))
        identity = {"answers": source_sha256(ref.answers, dict(storage_options))}
        return system_answers(ref.name, read.answers, ref.round), identity
    source_run = ref.run or run
    stage, step = ref.stage_step
    manifest = require_manifest(store, source_run, StepRef(stage, step))
    records = store.read_records(source_run, stage, step, RECORD_TYPES[manifest.record_type])
    identity = {"run": source_run, "step": ref.step, "content": manifest.content_digest}
    return system_answers(ref.name, records, ref.round), identity


@task(name="evaluate", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=5)
def evaluate_task(
    io: StepIO,
    evaluation: EvaluationConfig,
    judges: tuple[ModelSpec | None, ModelSpec | None],
    execution: ExecutionConfig,
) -> StepResult:
    """Reads: every system's and the baseline's answers. Writes: Judgement rows (one per prompt x
    system x judge) under io.target, sharded by prompt, and one AlpacaEval JSON per system.

    Fingerprint: the systems' contents, the judges (+ revisions), judge template and sampling.
    Prompts missing from a system or the baseline are left out and counted. `judges` =
    (reward model, pairwise LLM judge), either may be None.
    """
    evaluation.check_runnable()
    params = evaluation
    assert params.baseline is not None
    reward_spec, judge_spec = judges
    if reward_spec is None and judge_spec is None:
        raise ValueError("evaluate: no judge: set `reward`, `judge` or both")
    config = settings()
    store = open_store(io.storage_root, config)
    logger = get_run_logger()
    candidates: list[SystemAnswers] = []
    identities: dict[str, object] = {}
    for ref in params.systems:
        systems, identity = _load_system(store, io.run, ref, config.storage_options)
        candidates += systems
        identities[ref.name] = identity
    baselines, identities["__baseline__"] = _load_system(
        store, io.run, params.baseline, config.storage_options
    )
    if len(baselines) != 1:
        raise ValueError(
            f"baseline {params.baseline.name!r} holds {len(baselines)} refinement rounds: "
            "choose one with `round`"
        )
    (baseline,) = baselines
    shared = set(baseline.answers).intersection(*(s.answers for s in candidates))
    prompt_ids = sorted(shared)
    missing = len(set(baseline.answers).union(*(s.answers for s in candidates))) - len(shared)
    if not prompt_ids:
        raise ValueError("no prompt is answered by every system and the baseline")
    logger.info(
        "evaluating %s against %s on %d prompts (%d answered by only some systems, left out)",
        ", ".join(s.name for s in candidates),
        baseline.name,
        len(prompt_ids),
        missing,
    )
    template: JudgeTemplate | None = (
        load_judge_template(params.judge_template) if judge_spec is not None else None
    )
    step_config = {
        "step": "evaluate",
        "systems": identities,
        "rounds": {ref.name: ref.round for ref in [*params.systems, params.baseline]},
        "reward": None
        if reward_spec is None
        else model_identity(reward_spec, revision_of(reward_spec)),
        "judge": None
        if judge_spec is None
        else model_identity(judge_spec, revision_of(judge_spec)),
        "judge_template": None if template is None else template.version,
        "judge_sampling": params.judge_sampling.model_dump(mode="json"),
        "shard_size": params.shard_size,
    }
    chunks = split_into_shards(prompt_ids, params.shard_size)
    plan = plan_step(store, io.run, io.target, Judgement, step_config, shard_count=len(chunks))
    # Reward model and judge in one process: two vLLM engines split the GPU memory.
    together = sharing_gpu_memory(execution, [reward_spec, judge_spec])
    scorer = (
        LazyEngine(lambda: open_reward_model(reward_spec, together))
        if reward_spec is not None
        else None
    )
    judge = (
        LazyEngine(lambda: open_generator(judge_spec, together)) if judge_spec is not None else None
    )

    def compute(index: int, _: tuple[list[object], ...]) -> ShardOutput:
        rows = judge_prompts(
            chunks[index],
            candidates,
            baseline,
            scorer.get() if scorer is not None else None,
            judge.get() if judge is not None else None,
            template,
            params.judge_sampling,
        )
        unjudged = sum(r.preference is None for r in rows)
        return ShardOutput(rows, _shard_stats(len(chunks[index]), len(rows), unjudged))

    engines = [e for e in (scorer, judge) if e is not None]
    result = execute_plan(
        plan,
        compute,
        engines,
        extra_counts={"prompts_left_out": missing},
        execution=execution,
        models=[reward_spec, judge_spec],
    )
    _export_alpaca_eval(store, io.run, params.name, [*candidates, baseline], prompt_ids)
    return result


def _shard_stats(prompts: int, rows: int, unjudged: int) -> ShardStats:
    return ShardStats(counts={"prompts": prompts, "judgements": rows, "unjudged": unjudged})


def _export_alpaca_eval(
    store: DatasetStore, run: str, name: str, systems: list[SystemAnswers], prompt_ids: list[str]
) -> None:
    """reports/{name}/alpaca_eval/{system}.json: the official leaderboard's input format."""
    layout = RunLayout(run)
    for system in systems:
        answers = [system.answers[p] for p in prompt_ids]
        rows = alpaca_eval_rows(
            [render_request(a.prompt) for a in answers], [a.answer for a in answers], system.name
        )
        store.write_json(layout.report(name, f"alpaca_eval/{system.name}.json"), rows)


def _scaling_curves(rows: list[Judgement], resamples: int, seed: int) -> dict[str, list[Estimate]]:
    """Per refined system (`name@round{k}` rows of a reward judge): mean score per round."""
    scores: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        match = _ROUND.match(row.system)
        if match and row.judge.startswith("reward:") and row.candidate_score is not None:
            scores[match.group(1)][int(match.group(2))].append(row.candidate_score)
    return {
        system: [mean_estimate(by_round[k], resamples, seed) for k in sorted(by_round)]
        for system, by_round in scores.items()
        if len(by_round) > 1
    }


def format_report(report: EvaluationReport) -> str:
    """The evaluation table for a terminal, then where everything is."""
    lines = [
        text_table(summary_rows(report.summaries), SUMMARY_HEADER),
        "",
        f"table    {report.table_uri}",
        f"summary  {report.summary_uri}",
        *[f"plot     {uri}" for uri in report.plots.values()],
        *[f"export   {uri}" for uri in report.alpaca_eval.values()],
    ]
    return "\n".join(lines)


def render_report_markdown(report: EvaluationReport) -> str:
    """The artifact: one row per system x judge, then links to the plots and exports."""
    baseline = report.summaries[0].baseline if report.summaries else "-"
    lines = [
        f"### Evaluation against {baseline}",
        "",
        markdown_table(summary_rows(report.summaries), SUMMARY_HEADER),
        "",
        f"Table: `{report.table_uri}`  ",
        f"Summary: `{report.summary_uri}`",
        "",
        *[f"- plot {name}: [{uri}]({uri})" for name, uri in report.plots.items()],
        *[f"- AlpacaEval JSON {name}: `{uri}`" for name, uri in report.alpaca_eval.items()],
    ]
    return "\n".join(lines) + "\n"


@task(name="evaluation-report", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=5)
def report_task(io: StepIO, evaluation: EvaluationConfig) -> EvaluationReport:
    """Reads: the Judgement rows. Writes: reports/{name}/summary.json, win_rate.png,
    scaling.png (when refinement rounds were judged by a reward model), and the artifact."""
    params = evaluation
    store = open_store(io.storage_root)
    layout = RunLayout(io.run)
    rows = [
        r for r in store.read_records(io.run, *io.target, Judgement) if isinstance(r, Judgement)
    ]
    summaries = summarize_judgements(rows, params.resamples, params.seed)
    name = params.name
    plots = {"win_rate": layout.report(name, "win_rate.png")}
    store.files.write_bytes(plots["win_rate"], win_rate_png(summaries))
    curves = _scaling_curves(rows, params.resamples, params.seed)
    if curves:
        plots["scaling"] = layout.report(name, "scaling.png")
        store.files.write_bytes(plots["scaling"], scaling_curve_png(curves, "mean reward"))
    summary_path = layout.report(name, "summary.json")
    store.write_json(summary_path, [s.model_dump(mode="json") for s in summaries])
    systems = sorted({r.system for r in rows} | {r.baseline for r in rows})
    report = EvaluationReport(
        table_uri=store.step_uri(io.run, *io.target),
        summary_uri=store.uri(summary_path),
        plots={key: store.uri(path) for key, path in plots.items()},
        alpaca_eval={s: store.uri(layout.report(name, f"alpaca_eval/{s}.json")) for s in systems},
        summaries=summaries,
    )
    create_markdown_artifact(
        markdown=render_report_markdown(report),
        key=artifact_key(io.run, f"evaluation-{name}"),
        description=f"evaluation {name} of run {io.run}",
    )
    return report


def evaluation_step(evaluation: EvaluationConfig) -> StepRef:
    """eval/{name}: where the Judgement table lives."""
    return StepRef("eval", evaluation.name)

"""`avr plan` and its `--preview N`: run a flow's synthesis steps on its first N prompts (run
`{run_name}-preview`), print their rows, and calibrate the estimate (flows/plan.py) on them, so a
user sees real rows and a measured cost before paying for the whole job.
"""

from __future__ import annotations

import argparse
from typing import Any

from prefect import flow
from pydantic import BaseModel

from avr_core.estimate import format_estimate
from avr_core.layout import StepRef
from avr_core.settings import AvrSettings
from avr_core.steps import Stage1Steps, Stage2Steps
from flows.config_files import ConfigError, build_params, check_keys, load_config
from flows.deployments import FLOWS, get_flow
from flows.inspect_runs import open_store, print_show
from flows.local_prefect import temporary_api
from flows.params import RefineParams, Stage1Params, Stage2Sections, ThinkParams
from flows.plan import DEFAULT_TOKENS_PER_SECOND, plan_flow, preview_run_name, step_name
from tasks.datasets import build_pairs_task, select_rsft_task
from tasks.prompts import ingest_prompts_task
from tasks.runlog import hold_run
from tasks.stage2 import greedy_search_task, select_trajectories_task
from tasks.testtime import own_answers_task, refine_task, think_task
from tasks.trees import generate_trees_task, score_trees_task

__all__ = ["add_plan_arguments", "preview", "preview_flow", "run_plan"]


def _preview_params(params: BaseModel, prompts: int) -> BaseModel:
    """The flow's parameters for its preview run: the first `prompts` prompts in one shard, one
    worker, written to `{run_name}-preview` beside the run."""
    ingest = params.ingest.model_copy(  # type: ignore[attr-defined]
        update={"max_prompts": prompts, "shard_size": prompts}
    )
    execution = params.execution.model_copy(update={"workers": 1})  # type: ignore[attr-defined]
    update: dict[str, Any] = {
        "run_name": preview_run_name(params.run_name),  # type: ignore[attr-defined]
        "ingest": ingest,
        "execution": execution,
    }
    if isinstance(params, RefineParams) and params.refine.answers is not None:
        raise ConfigError("--preview runs on prompts; refine over imported answers has none")
    return params.model_copy(update=update)


@flow(name="preview", log_prints=True)
def preview_flow(params: BaseModel) -> list[str]:
    """The synthesis steps a preview runs, in order: what needs no model trained by the run.

    Stage I: the seed model's trees, scores, RSFT examples and the DPO pairs they would give;
    Stage II: the greedy search and its trajectories (long responses need the Stage II SFT model
    that the run trains); refine and think: the whole flow."""
    p: Any = params
    steps: list[StepRef] = [Stage1Steps.PROMPTS]
    with hold_run(p.storage_root, p.run_name, "preview"):
        policy, tree = getattr(p, "policy", None), getattr(p, "tree", None)
        ingest_prompts_task(p.step_io(Stage1Steps.PROMPTS), p.ingest, policy, tree)
        if isinstance(p, Stage1Params):
            s = Stage1Steps
            generate_trees_task(
                p.step_io(s.SEED_TREES, s.PROMPTS), p.policy, p.tree, p.templates_dir, p.execution
            )
            score_trees_task(p.step_io(s.SEED_SCORED, s.SEED_TREES), p.reward, p.execution)
            select_rsft_task(p.step_io(s.RSFT, s.SEED_SCORED), p.selection, p.templates_dir)
            build_pairs_task(p.step_io(s.PAIRS, s.SEED_SCORED), p.selection, p.templates_dir)
            steps += [s.SEED_TREES, s.SEED_SCORED, s.RSFT, s.PAIRS]
        if isinstance(p, Stage2Sections):
            # After Stage I in `avr`, the search runs with the Stage I model; a preview has only
            # the configured policy.
            greedy_search_task(
                p.step_io(Stage2Steps.SEARCH, Stage1Steps.PROMPTS),
                (p.policy, p.reward),
                p.search,
                p.templates_dir,
                p.execution,
            )
            select_trajectories_task(
                p.step_io(Stage2Steps.TRAJECTORIES, Stage2Steps.SEARCH),
                p.selection,
                p.templates_dir,
            )
            steps += [Stage2Steps.SEARCH, Stage2Steps.TRAJECTORIES]
        if isinstance(p, RefineParams):
            own_answers_task(
                p.step_io(p.start_step, Stage1Steps.PROMPTS), p.policy, p.refine, p.execution
            )
            refine_task(
                p.step_io(p.refined_step, p.start_step),
                (p.policy, p.reward),
                p.refine,
                p.templates_dir,
                p.execution,
            )
            steps += [p.start_step, p.refined_step]
        if isinstance(p, ThinkParams):
            think_task(p.step_io(p.step, Stage1Steps.PROMPTS), p.policy, p.think, p.execution)
            steps.append(p.step)
    return [step_name(ref) for ref in steps]


def preview(params: BaseModel, prompts: int, settings: AvrSettings, rows: int = 2) -> list[str]:
    """Run the preview of `params` on its first `prompts` prompts and print each step's rows."""
    preview_params = _preview_params(params, prompts)
    with temporary_api():
        steps = preview_flow(preview_params)
    store = open_store(preview_params.storage_root, settings)  # type: ignore[attr-defined]
    for step in steps:
        print_show(store, preview_params.run_name, step, rows, width=400)  # type: ignore[attr-defined]
    return steps


# ---- the command -----------------------------------------------------------------------------


def add_plan_arguments(parser: argparse.ArgumentParser, set_help: str) -> None:
    """The arguments of `avr plan` (its subparser in flows/cli.py)."""
    parser.add_argument("flow", help=f"flow name: {', '.join(e.name for e in FLOWS)}")
    parser.add_argument("--config", help="YAML config, e.g. deployments/configs/tiny.yaml")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=set_help
    )
    parser.add_argument(
        "--preview",
        type=int,
        metavar="N",
        help="first run the synthesis steps on the first N prompts (run RUN-preview), print "
        "their rows, and calibrate the estimate on them",
    )
    parser.add_argument(
        "--tokens-per-second",
        type=float,
        default=DEFAULT_TOKENS_PER_SECOND,
        help=f"throughput for steps not measured yet (default {DEFAULT_TOKENS_PER_SECOND:g})",
    )
    parser.add_argument("--calibrate-from", metavar="RUN", help="calibrate on this run's steps")


def run_plan(args: argparse.Namespace, settings: AvrSettings) -> int:
    """`avr plan`: validate the config as `avr run` does, preview if asked, print the estimate."""
    entry = get_flow(args.flow)
    config = load_config(args.config) if args.config else {}
    check_keys(config, [e.params_model for e in FLOWS], source=str(args.config))
    params = build_params(entry.params_model, config, args.overrides)
    if args.preview is not None:
        if args.preview < 1:
            raise ConfigError(f"--preview needs at least 1 prompt, got {args.preview}")
        preview(params, args.preview, settings)
    if args.tokens_per_second <= 0:
        raise ConfigError(f"--tokens-per-second must be > 0, got {args.tokens_per_second}")
    estimate = plan_flow(entry.name, params, settings, args.tokens_per_second, args.calibrate_from)
    print(format_estimate(estimate))
    return 0

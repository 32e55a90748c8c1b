"""Nightly regeneration: refresh the Stage I datasets for a prompt source that keeps changing.

Each run publishes a dated, self-contained version `runs/{run_name}-{YYYYMMDD}`:

    inputs/source         today's whole prompt set (validated, sharded)
    inputs/prompts        only the prompts no earlier version has trees for
    stage1/seed_trees     trees for those prompts (the seed policy)
    stage1/new_scored     their scores
    stage1/seed_scored    today's scored trees: new ones + ones reused from the previous version
    stage1/rsft           RSFT examples      (from stage1/seed_scored)
    stage1/pairs          DPO pairs          (from stage1/seed_scored)
    regenerate.json       what was reused, from where, under which settings

and points `versions/{run_name}/latest.json` (plus `versions/{run_name}/{YYYYMMDD}.json`) at it.
The reuse rules are in `avr_core.versions`; generation, scoring and selection are the Stage I tasks.
"""

from __future__ import annotations

from prefect import flow

from avr_core.fingerprint import scored_trees_key
from avr_core.templates import load_templates
from avr_core.versions import PublishedVersion, today, version_run_name
from avr_core.versions import RegenerateSteps as S
from flows.params import RegenerateParams
from tasks.datasets import build_pairs_task, select_rsft_task
from tasks.prompts import ingest_prompts_task
from tasks.regenerate import merge_scored_task, plan_regeneration_task, publish_version_task
from tasks.runlog import hold_run, start_run_task
from tasks.trees import generate_trees_task, revision_of, score_trees_task

__all__ = ["regenerate"]


@flow(name="regenerate", log_prints=True)
def regenerate(params: RegenerateParams | None = None) -> PublishedVersion:
    """Publish today's version of the Stage I datasets, generating only what is new."""
    params = params or RegenerateParams()
    dataset = params.run_name
    version = params.version or today(params.timezone)
    # One run per version: every step below reads and writes runs/{dataset}-{version}.
    p = params.model_copy(update={"run_name": version_run_name(dataset, version)})
    with hold_run(p.storage_root, p.run_name, "regenerate"):
        start_run_task(p.storage_root, p.run_name, "regenerate", p)
        trees_key = scored_trees_key(
            p.policy,
            revision_of(p.policy),
            p.reward,
            revision_of(p.reward),
            load_templates(p.templates_dir).version,
            p.tree,
        )
        shard_size = p.ingest.shard_size

        ingest_prompts_task(p.step_io(S.SOURCE), p.ingest, p.policy, p.tree)
        plan = plan_regeneration_task(
            p.step_io(S.NEW_PROMPTS, S.SOURCE), dataset, version, trees_key, shard_size
        )
        if plan.new:
            generate_trees_task(
                p.step_io(S.NEW_TREES, S.NEW_PROMPTS),
                p.policy,
                p.tree,
                p.templates_dir,
                p.execution,
            )
            score_trees_task(p.step_io(S.NEW_SCORED, S.NEW_TREES), p.reward, p.execution)
        merge_scored_task(p.step_io(S.SCORED), plan, shard_size)
        select_rsft_task(p.step_io(S.RSFT, S.SCORED), p.selection, p.templates_dir)
        build_pairs_task(p.step_io(S.PAIRS, S.SCORED), p.selection, p.templates_dir)
        published = publish_version_task(p.storage_root, dataset, version, p.run_name, plan)
        print(
            f"published {dataset} version {version}: {p.storage_root}/runs/{p.run_name} "
            f"({plan.new} prompts generated, {plan.reused} reused from "
            f"{plan.previous or 'no earlier version'})"
        )
    return published

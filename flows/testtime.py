"""Test-time flows (DESIGN section 9): `refine` (N prompted rounds by a Stage I model, also over
another system's outputs) and `think` (a Stage II model's autonomous long response).

Both write under {storage_root}/runs/{run_name}/testtime/ and resume like every step; their
step artifacts carry the per-round means (score and answer length: the scaling curve) and the
format retries and failures.
"""

from __future__ import annotations

from prefect import flow

from avr_core.reporting import format_run_summary
from avr_core.results import RunSummary
from avr_core.steps import Stage1Steps
from flows.params import RefineParams, ThinkParams
from flows.plan import log_estimate
from flows.stage1 import publish_summary
from tasks.prompts import ingest_prompts_task
from tasks.runlog import hold_run, start_run_task
from tasks.testtime import import_answers_task, own_answers_task, refine_task, think_task

__all__ = ["refine", "think"]

PROMPTS = Stage1Steps.PROMPTS


@flow(name="refine", log_prints=True)
def refine(params: RefineParams | None = None) -> RunSummary:
    """Starting answers (the model's own, or `refine.answers`), then N refinement rounds."""
    p = params or RefineParams()
    with hold_run(p.storage_root, p.run_name, "refine"):
        run_record_uri = start_run_task(p.storage_root, p.run_name, "refine", p)
        log_estimate("refine", p)
        steps = []
        if p.refine.answers is not None:
            start = import_answers_task(p.step_io(p.start_step), p.refine)
        else:
            steps.append(ingest_prompts_task(p.step_io(PROMPTS), p.ingest, p.policy))
            start = own_answers_task(
                p.step_io(p.start_step, PROMPTS), p.policy, p.refine, p.execution
            )
        refined = refine_task(
            p.step_io(p.refined_step, p.start_step),
            (p.policy, p.reward),
            p.refine,
            p.templates_dir,
            p.execution,
        )
        return publish_summary("refine", p, run_record_uri, [*steps, start, refined], [])


@flow(name="think", log_prints=True)
def think(params: ThinkParams | None = None) -> RunSummary:
    """One long response per prompt and its parsed final answer."""
    p = params or ThinkParams()
    with hold_run(p.storage_root, p.run_name, "think"):
        run_record_uri = start_run_task(p.storage_root, p.run_name, "think", p)
        log_estimate("think", p)
        prompts = ingest_prompts_task(p.step_io(PROMPTS), p.ingest, p.policy)
        thought = think_task(p.step_io(p.step, PROMPTS), p.policy, p.think, p.execution)
        return publish_summary("think", p, run_record_uri, [prompts, thought], [])


if __name__ == "__main__":
    print(format_run_summary(refine()))

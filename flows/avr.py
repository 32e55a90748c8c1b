"""The whole method as one Prefect flow: Stage I, then Stage II from the Stage I DPO model.

One run name holds both stages' data (stage1/..., stage2/..., checkpoints/...), under one lease;
re-running resumes every step from its committed shards and synced checkpoints.
"""

from __future__ import annotations

from prefect import flow

from avr_core.reporting import format_run_summary
from avr_core.results import RunSummary
from flows.params import AvrParams
from flows.plan import log_estimate
from flows.stage1 import publish_summary, run_stage1
from flows.stage2 import run_stage2
from tasks.runlog import hold_run, start_run_task

__all__ = ["avr"]


@flow(name="avr", log_prints=True)
def avr(params: AvrParams | None = None) -> RunSummary:
    """Stage I then Stage II; returns every dataset and checkpoint of both, with counts."""
    p = params or AvrParams()
    with hold_run(p.storage_root, p.run_name, "avr"):
        run_record_uri = start_run_task(p.storage_root, p.run_name, "avr", p)
        log_estimate("avr", p)
        stage1_steps, stage1_models = run_stage1(p)
        stage1_dpo = stage1_models[-1]
        stage1_model = p.policy.model_copy(update={"path": stage1_dpo.final_uri})
        stage2_steps, stage2_models = run_stage2(p, p, stage1_model)
        return publish_summary(
            "avr",
            p,
            run_record_uri,
            [*stage1_steps, *stage2_steps],
            [*stage1_models, *stage2_models],
        )


if __name__ == "__main__":
    print(format_run_summary(avr()))

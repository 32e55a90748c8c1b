"""The `evaluate` flow (DESIGN section 9): systems vs a baseline on the same prompts, judged by a
reward model and/or a pairwise LLM judge; win rates and length-controlled win rates with
bootstrap CIs, a Parquet table (eval/{name}), a summary, PNG plots and AlpacaEval JSON
(reports/{name}/), and a markdown artifact linking them.
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from flows.params import EvaluateParams
from tasks.evaluate import (
    EvaluationReport,
    evaluate_task,
    evaluation_step,
    format_report,
    report_task,
)
from tasks.runlog import hold_run

__all__ = ["evaluate"]


@flow(name="evaluate", log_prints=True)
def evaluate(params: EvaluateParams | None = None) -> EvaluationReport:
    """Judge every system against the baseline, then write the report."""
    p = params or EvaluateParams()
    p.check_runnable()
    step = evaluation_step(p.evaluation)
    with hold_run(p.storage_root, p.run_name, "evaluate"):
        evaluate_task(p.step_io(step), p.evaluation, (p.reward, p.judge), p.execution)
        report = report_task(p.step_io(step), p.evaluation)
    get_run_logger().info("evaluation %s:\n%s", p.evaluation.name, format_report(report))
    return report

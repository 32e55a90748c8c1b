"""`step-slice`: one slice of a scaled-out step, a child flow run on a worker of its own.

A step task running with `execution.workers > 1` launches this flow once per slice
(tasks/slices.py) with the task's name, its parameters as JSON and the slice's shard indices.
The flow calls that same task with `execution.shards` set, so a slice runs the ordinary step
code: one engine load, its shards committed one by one, nothing sealed (the parent seals).
Deployed once per work pool: `step-slice/gpu` (the default `execution.slice_deployment`) and
`step-slice/cpu`.

`SLICE_TASKS` is the explicit list of step tasks that can run in slices: every task of a step
that loads a model (tests/test_scale_out.py checks that none is missing).
"""

from __future__ import annotations

from typing import Any

from prefect import Task, flow

from avr_core.results import StepResult
from tasks.evaluate import evaluate_task
from tasks.slices import slice_arguments, task_parameters_from_json
from tasks.stage2 import greedy_search_task, sample_long_responses_task, score_long_responses_task
from tasks.testtime import own_answers_task, refine_task, think_task
from tasks.trees import generate_trees_task, score_trees_task

__all__ = ["SLICE_TASKS", "step_slice"]

SLICE_TASKS: dict[str, Task[..., StepResult]] = {
    task.name: task
    for task in (
        generate_trees_task,
        score_trees_task,
        greedy_search_task,
        sample_long_responses_task,
        score_long_responses_task,
        own_answers_task,
        refine_task,
        think_task,
        evaluate_task,
    )
}


@flow(name="step-slice")
def step_slice(task_name: str, parameters: dict[str, Any], shards: list[int]) -> StepResult:
    """Compute `shards` of the step that task `task_name` runs with `parameters` (its arguments
    as JSON); commit each, seal nothing. Returns what this slice computed."""
    task = SLICE_TASKS.get(task_name)
    if task is None:
        raise ValueError(
            f"step-slice: no step task {task_name!r} (this worker's code has "
            f"{', '.join(sorted(SLICE_TASKS))}): is it the same version as the parent's?"
        )
    arguments = task_parameters_from_json(task.fn, parameters)
    part: StepResult = task(**slice_arguments(arguments, shards))
    return part

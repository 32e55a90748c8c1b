"""A tiny replication of AvR on CPU: did the method help the tiny model on prompts it never saw?

1. Training run (`replication-train`): the `stage1` flow, then the `stage2` flow from the Stage I
   DPO model (what the `avr` flow does), with the tiny config on the bundled training split
   (`bundled:train`, 24 prompts); `--stages 1` stops after Stage I. When Stage II keeps no data
   to train on at this scale, that is printed and the rest runs without it.
2. Test-time run (`replication-eval`) on the held-out split (`bundled:heldout`, prompts training
   never reads): the `refine` flow with the seed model (`seed`: rounds 0..N of its own answers)
   and with the Stage I DPO model (`stage1`: rounds 0..N), and with Stage II the `think` flow of
   the Stage II DPO model (`stage2`: one long response, only its final answer judged).
3. The `evaluate` flow: every system against the seed model's plain answers (`base` = seed round
   0) with the rules reward (the held-out prompts' verifiable constraints) and the tiny model as a
   pairwise judge (both orders per pair); win rates, length-controlled win rates, CIs, plots.

It prints the evaluation table, the refinement-round curve (mean rules score per round, per
model), the time of each phase, and a verdict per system that only claims what the CIs show.
Everything runs through the same flows and config as `avr run`, under a temporary Prefect API, and
resumes: a second invocation with the same `--root` reuses every committed shard and model.

    python -m benchmarks.replication                      # Stage I and II (about 45 min, 2 cores)
    python -m benchmarks.replication --stages 1           # Stage I only
    python -m benchmarks.replication --set refine.rounds=3 --set tree.sampling.max_tokens=64
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

# As `avr run` (flows/cli.py): read once by Prefect and the model libraries when first imported.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from pydantic import BaseModel

from avr_core.config import SystemRef
from avr_core.evaluation import SystemSummary, format_estimate_ci
from avr_core.reporting import text_table
from avr_core.results import RunSummary
from avr_core.steps import Stage1Steps, Stage2Steps
from flows.config_files import TINY_CONFIG, build_params, load_config
from flows.evaluate import evaluate
from flows.local_prefect import temporary_api
from flows.params import EvaluateParams, RefineParams, Stage1Params, Stage2Params, ThinkParams
from flows.stage1 import stage1
from flows.stage2 import stage2
from flows.testtime import refine, think
from tasks.evaluate import EvaluationReport, format_report

TRAIN_RUN = "replication-train"
EVAL_RUN = "replication-eval"
BASELINE = "base"
ParamsT = TypeVar("ParamsT", bound=BaseModel)


class Phases:
    """Wall time of each phase, printed at the end."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def timed(self, name: str) -> Iterator[None]:
        print(f"\n=== {name}", flush=True)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = time.perf_counter() - start
            print(f"=== {name}: {self.seconds[name] / 60:.1f} min", flush=True)


def _params(
    model: type[ParamsT], config: dict[str, Any], sets: Sequence[str], *extra: str
) -> ParamsT:
    """The flow's parameters as `avr run` builds them: the config file, then the overrides of
    the sections this flow has (one `--set` list serves flows with different sections)."""
    own = [item for item in sets if item.split("=", 1)[0].split(".")[0] in model.model_fields]
    return build_params(model, config, [*own, *extra])


def evaluation_config(config: dict[str, Any], systems: list[SystemRef]) -> dict[str, Any]:
    """The config with its evaluation section naming our systems against the seed model's plain
    answers, and the seed model (the config's policy: backend, dtype, device) as pairwise judge."""
    section = {
        **config.get("evaluation", {}),
        "systems": [s.model_dump(exclude_none=True) for s in systems],
        "baseline": {"name": BASELINE, "step": "testtime/seed", "round": 0},
        "name": "replication",
    }
    return {**config, "evaluation": section, "judge": config["policy"]}


def verdict(summary: SystemSummary) -> str:
    """What the win rate's CI allows one to say about a system against the baseline."""
    estimate = summary.win_rate
    if estimate is None:
        return "no verdict (the judge parsed no game)"
    if estimate.ci_low > 50.0:
        return "better than the seed model (CI above 50%)"
    if estimate.ci_high < 50.0:
        return "worse than the seed model (CI below 50%)"
    return "no difference detectable at this scale (CI contains 50%)"


def round_curve(refined: dict[str, RunSummary]) -> list[tuple[str, ...]]:
    """Rows `round, mean score of each model`: the test-time scaling curve on held-out prompts."""
    means = {
        name: next(s.means for s in summary.steps if s.name == f"testtime/{name}")
        for name, summary in refined.items()
    }
    rounds = sorted(
        {int(key.rsplit("_", 1)[1]) for m in means.values() for key in m if "score_round_" in key}
    )
    return [
        (str(k), *(f"{m.get(f'score_round_{k}', float('nan')):.3f}" for m in means.values()))
        for k in rounds
    ]


def print_results(report: EvaluationReport, refined: dict[str, RunSummary], phases: Phases) -> None:
    print("\n" + format_report(report))
    print("\nrefinement-round curve on held-out prompts (mean rules score, higher is better):")
    print(text_table(round_curve(refined), ("round", *refined)))
    print("\nverdicts (each system vs the seed model's plain answers, 95% bootstrap CIs):")
    rows = [
        (
            s.system,
            s.judge.split(":")[0],
            f"{s.judged}/{s.prompts}",
            format_estimate_ci(s.win_rate),
            format_estimate_ci(s.lc_win_rate),
            verdict(s),
        )
        for s in report.summaries
    ]
    print(text_table(rows, ("system", "judge", "judged", "win rate %", "LC win rate %", "verdict")))
    total = sum(phases.seconds.values())
    timing = [(name, f"{s / 60:.1f}") for name, s in phases.seconds.items()]
    print("\n" + text_table([*timing, ("total", f"{total / 60:.1f}")], ("phase", "minutes")))


def train(
    stages: int, config: dict[str, Any], sets: Sequence[str], root: str
) -> tuple[str, str | None, str | None]:
    """Stage I (then Stage II from its DPO model, in the same run, as the `avr` flow does) on the
    training split: the Stage I and Stage II DPO models' URIs, and why Stage II gave no model."""
    common = (f"run_name={TRAIN_RUN}", f"storage_root={root}", "ingest.prompts=bundled:train")
    summary = stage1(params=_params(Stage1Params, config, sets, *common))
    stage1_model = summary.checkpoints[Stage1Steps.TRAIN_DPO.step]
    if stages == 1:
        return stage1_model, None, None
    try:
        summary = stage2(
            params=_params(Stage2Params, config, sets, *common, f"policy.path={stage1_model}")
        )
    except ValueError as err:
        # At this scale Stage II may keep no trajectory or no length-controlled pair (the
        # training step then refuses an empty dataset): report Stage I rather than nothing.
        return stage1_model, None, str(err)
    return stage1_model, summary.checkpoints[Stage2Steps.TRAIN_DPO.step], None


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stages", type=int, choices=(1, 2), default=2)
    parser.add_argument(
        "--root", default="avr-output/replication", help="storage root (resumes when reused)"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a field of the tiny config for every flow that has it",
    )
    args = parser.parse_args(argv)
    config = load_config(TINY_CONFIG)
    sets, root = args.overrides, args.root
    phases = Phases()
    with temporary_api():
        with phases.timed(
            f"train: Stage I{' and II' if args.stages == 2 else ''} on bundled:train"
        ):
            stage1_model, stage2_model, stage2_failure = train(args.stages, config, sets, root)
        if stage2_failure is not None:
            print(f"\nStage II gave no model, so it is not evaluated: {stage2_failure}")

        heldout = (f"run_name={EVAL_RUN}", f"storage_root={root}", "ingest.prompts=bundled:heldout")
        refined: dict[str, RunSummary] = {}
        for name, weights in (("seed", None), ("stage1", stage1_model)):
            model = () if weights is None else (f"policy.path={weights}",)
            params = _params(RefineParams, config, sets, *heldout, f"name={name}", *model)
            with phases.timed(f"refine: {name} model on bundled:heldout"):
                refined[name] = refine(params=params)
        systems = [SystemRef(name=name, step=f"testtime/{name}") for name in refined]
        if stage2_model is not None:
            thinker = _params(
                ThinkParams, config, sets, *heldout, "name=stage2", f"policy.path={stage2_model}"
            )
            with phases.timed("think: Stage II model on bundled:heldout"):
                think(params=thinker)
            systems.append(SystemRef(name="stage2", step="testtime/stage2"))

        evaluation = _params(
            EvaluateParams,
            evaluation_config(config, systems),
            sets,
            f"run_name={EVAL_RUN}",
            f"storage_root={root}",
        )
        with phases.timed("evaluate: rules reward + pairwise tiny judge"):
            report = evaluate(params=evaluation)
    print_results(report, refined, phases)


if __name__ == "__main__":
    main()

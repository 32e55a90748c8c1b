"""The pipeline the fault suite kills, cuts off and corrupts: Stage I's data steps, for real.

`python -m tests.faults.pipeline ROOT RUN [options]` runs ingest -> refinement trees (the tiny
policy, transformers) -> scores (the tiny Bradley-Terry reward model) -> RSFT -> DPO pairs through
the same step protocol and per-shard functions the Prefect tasks run (`avr_core.steps`,
`avr_core.step_kinds`), holding the run's lease, in one process: cheap enough to kill dozens of
times. Storage options come from `AVR_STORAGE_OPTIONS`, as for every factory process. It prints
one JSON line per committed or failed shard, and `done` at the end.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from avr_core.config import ExecutionConfig, SelectionConfig, TransformersModel, TreeConfig
from avr_core.engines import load_generator, load_reward_model
from avr_core.engines.base import Generator, RewardModel
from avr_core.ingest import bundled_prompts_path, read_prompts
from avr_core.lease import RunLease
from avr_core.models import TINY_MODEL, TINY_REWARD_MODEL, resolve_model_dir
from avr_core.schemas import (
    Lineage,
    PreferencePair,
    PromptRecord,
    RefinementTree,
    Sampling,
    SFTExample,
)
from avr_core.settings import AvrSettings
from avr_core.step_kinds import pair_shards, rsft_shards, scoring_shards, tree_shards
from avr_core.steps import (
    ShardEvent,
    ShardOutput,
    Source,
    Stage1Steps,
    plan_step,
    run_step,
    split_into_shards,
)
from avr_core.storage import DatasetStore
from avr_core.templates import load_templates

S = Stage1Steps
# Every data step of the pipeline, its record type, and what identifies one row.
STEPS: dict[str, tuple[Any, type, Callable[[Any], str]]] = {
    "prompts": (S.PROMPTS, PromptRecord, lambda r: r.prompt_id),
    "seed_trees": (S.SEED_TREES, RefinementTree, lambda r: r.prompt_id),
    "seed_scored": (S.SEED_SCORED, RefinementTree, lambda r: r.prompt_id),
    "rsft": (S.RSFT, SFTExample, lambda r: f"{r.prompt_id}/{r.kind}"),
    "pairs": (
        S.PAIRS,
        PreferencePair,
        lambda r: f"{r.prompt_id}/{r.kind}/{r.chosen[-1].content[:40]}",
    ),
}


class _Lazy:
    def __init__(self, load: Callable[[], Any]) -> None:
        self.load, self.engine = load, None

    def __call__(self) -> Any:
        if self.engine is None:
            self.engine = self.load()
        return self.engine


def run_pipeline(root: str, run: str, prompts: int, shard_size: int, max_tokens: int) -> None:
    settings = AvrSettings()
    store = DatasetStore(root, settings.storage_options)
    execution = ExecutionConfig(device="cpu", batch_size=16)
    tree = TreeConfig(x=1, y=2, sampling=Sampling(max_tokens=max_tokens, seed=0))
    selection = SelectionConfig()
    templates = load_templates()

    def progress(event: ShardEvent) -> None:
        print(
            json.dumps({"step": str(event.target), "shard": event.index, "error": event.error}),
            flush=True,
        )

    def load_policy() -> Generator:
        spec = TransformersModel(path=TINY_MODEL)
        model_dir = resolve_model_dir(TINY_MODEL, cache_dir=settings.cache_dir)
        return load_generator(spec, execution, model_dir=model_dir, settings=settings)

    def load_reward() -> RewardModel:
        spec = TransformersModel(path=TINY_REWARD_MODEL)
        model_dir = resolve_model_dir(TINY_REWARD_MODEL, cache_dir=settings.cache_dir)
        return load_reward_model(spec, execution, model_dir=model_dir, settings=settings)

    with RunLease(store.files, run, "faults-pipeline", heartbeat_s=5):
        records = read_prompts(bundled_prompts_path()).prompts[:prompts]
        shards = split_into_shards(records, shard_size)
        plan = plan_step(
            store, run, S.PROMPTS, PromptRecord, {"faults": prompts}, shard_count=len(shards)
        )
        run_step(plan, lambda index, _: ShardOutput(shards[index]), progress)

        policy, reward = _Lazy(load_policy), _Lazy(load_reward)
        config = {"tree": tree.model_dump(mode="json")}
        lineage = Lineage(run=run, stage=S.SEED_TREES.stage, step=S.SEED_TREES.step)
        trees = plan_step(
            store, run, S.SEED_TREES, RefinementTree, config, [Source(S.PROMPTS, PromptRecord)]
        )
        run_step(trees, tree_shards(policy, templates, tree, lineage), progress)
        scored = plan_step(
            store,
            run,
            S.SEED_SCORED,
            RefinementTree,
            {"reward": TINY_REWARD_MODEL},
            [Source(S.SEED_TREES, RefinementTree)],
        )
        run_step(scored, scoring_shards(reward), progress)
        selected = {"selection": selection.model_dump(mode="json")}
        source = [Source(S.SEED_SCORED, RefinementTree)]
        rsft = plan_step(store, run, S.RSFT, SFTExample, selected, source)
        run_step(rsft, rsft_shards(selection, templates), progress)
        pairs = plan_step(store, run, S.PAIRS, PreferencePair, selected, source)
        run_step(pairs, pair_shards(selection, templates), progress)
    print("done", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root")
    parser.add_argument("run")
    parser.add_argument("--prompts", type=int, default=6)
    parser.add_argument("--shard-size", type=int, default=1)
    parser.add_argument("--max-tokens", type=int, default=8)
    args = parser.parse_args(argv)
    run_pipeline(args.root, args.run, args.prompts, args.shard_size, args.max_tokens)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""SFT and DPO training with TRL, in its own process, with checkpoints synced to storage.

`train(job)` reads the dataset straight from storage, trains with TRL, uploads every trainer
checkpoint to `{checkpoints}/checkpoint-N` as it is saved, and resumes from the latest uploaded
checkpoint when the same job is started again (on any machine). The final model, LoRA merged in,
goes to `{checkpoints}/final`; `{checkpoints}/_complete.json`, written last, makes a re-run
return it without training.

Training never runs in the process that holds a vLLM engine (DESIGN section 6):
`run_training_subprocess(job, num_gpus)` launches `python -m avr_core.training JOB.json
RESULT.json` (or `accelerate launch` on several GPUs) and returns the final URI the child reports.
The TRL adapter is `avr_core.trl_config`; checkpoint sync is `avr_core.checkpoints`.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from avr_core.checkpoints import (
    checkpoint_step,
    download_dir,
    invalidate_completion,
    read_sync_marker,
    synced_checkpoint_steps,
    upload_dir,
    verify_synced_dir,
)
from avr_core.config import TrainingConfig
from avr_core.devices import train_on_cpu
from avr_core.hashing import short_hash
from avr_core.layout import RunLayout, StepRef
from avr_core.models import TINY_MODEL, resolve_model_dir
from avr_core.processes import die_with_parent
from avr_core.schemas import ArrowRecord, PreferencePair, SFTExample
from avr_core.settings import AvrSettings
from avr_core.storage import DatasetStore
from avr_core.trl_config import to_dpo_config, to_lora_config, to_sft_config
from avr_core.workdirs import claim_dir, remove_abandoned_dirs

if TYPE_CHECKING:
    import datasets
    from transformers import Trainer, TrainerCallback

__all__ = [
    "TrainJob",
    "TrainingFailedError",
    "run_training_subprocess",
    "tokens_seen",
    "train",
    "trained_counts",
    "training_command",
]

# The columns TRL reads; the rest (prompt_id, kind, scores, lineage) would reach its collator.
_TRL_COLUMNS = {"sft": ["messages"], "dpo": ["prompt", "chosen", "rejected"]}
_RECORD_TYPES: dict[str, type[ArrowRecord]] = {"sft": SFTExample, "dpo": PreferencePair}
_TAIL_LINES = 60

logger = logging.getLogger(__name__)


class TrainingFailedError(RuntimeError):
    """The training process exited with an error; the message carries the tail of its output."""


class TrainJob(BaseModel):
    """Everything one training process needs; crosses the process boundary as JSON."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["sft", "dpo"]
    base_model: str = Field(
        TINY_MODEL,
        description="bundled model name, local directory or storage URI of a saved model",
    )
    store_root: str = Field(description="storage root URI (file://, s3://, any fsspec URL)")
    cache_dir: str | None = Field(None, description="model cache (None: ~/.cache/avr-factory)")
    run: str
    dataset_stage: str = Field(description="stage holding the training set, e.g. 'stage1'")
    dataset_step: str = Field(description="step holding the training set, e.g. 'rsft'")
    train_step: str = Field(description="name of this training step, e.g. 'stage1_sft'")
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="execution.device: cpu forces the CPU even where a GPU is visible"
    )
    work_dir: str = Field(
        "",
        description="local scratch directory for trainer checkpoints, unique to this attempt "
        "(`run_training_subprocess` claims one under its `work_root`)",
    )
    crash_after_step_for_tests: int | None = Field(
        None, description="test hook: crash the process after this optimizer step (a kill)"
    )

    @property
    def dataset(self) -> StepRef:
        return StepRef(self.dataset_stage, self.dataset_step)

    def fingerprint(self, dataset_identity: str = "") -> str:
        """Hash of what determines the trained model; execution details and test hooks excluded.

        `dataset_identity` names the dataset's contents (see `_dataset_identity`), so a training
        set regenerated under the same step name is not mistaken for the one trained on.
        """
        content = self.model_dump(
            mode="json",
            include={"kind", "base_model", "run", "dataset_stage", "dataset_step", "training"},
        )
        return short_hash({**content, "dataset_identity": dataset_identity})


# --------------------------------------------------------------------------------------------
# Trainer callbacks
# --------------------------------------------------------------------------------------------


def _make_sync_callback(store: DatasetStore, checkpoints: str) -> TrainerCallback:
    """A TrainerCallback that uploads each saved checkpoint, then marks it synced."""
    from transformers import TrainerCallback

    class SyncCheckpointCallback(TrainerCallback):  # type: ignore[misc]
        """After every checkpoint save, copy `checkpoint-N` to storage (main process only)."""

        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            # Other ranks write their own RNG files into the checkpoint: wait until all are done.
            if args.world_size > 1:
                from accelerate import PartialState

                PartialState().wait_for_everyone()
            if state.is_world_process_zero:
                name = f"checkpoint-{state.global_step}"
                # upload_dir writes its sync marker last: a cut-off upload never looks complete.
                upload_dir(store.files, Path(args.output_dir) / name, f"{checkpoints}/{name}")
            return control

    return SyncCheckpointCallback()


def _make_start_recorder() -> Any:
    """A callback that notes the global step training (re)starts from (the resume evidence)."""
    from transformers import TrainerCallback

    class StartStepRecorder(TrainerCallback):  # type: ignore[misc]
        start_global_step: int | None = None

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            self.start_global_step = state.global_step
            return control

    return StartStepRecorder()


def _make_crash_callback(after_step: int) -> TrainerCallback:
    """A callback that kills training after `after_step` steps (tests of resume)."""
    from transformers import TrainerCallback

    class CrashAfterStepCallback(TrainerCallback):  # type: ignore[misc]
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            # on_step_end runs before that step's checkpoint save: crash one step later than a save.
            if state.global_step >= after_step:
                raise RuntimeError(f"crash_after_step_for_tests={after_step}: crashing on purpose")
            return control

    return CrashAfterStepCallback()


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def _dataset_identity(store: DatasetStore, job: TrainJob) -> str:
    """Hash of the training set's shard hashes from its manifest ("" for an unsealed step)."""
    manifest = store.read_manifest(job.run, *job.dataset)
    if manifest is None:
        return ""
    return short_hash([shard.sha256 for shard in sorted(manifest.shards, key=lambda s: s.index)])


def _check_same_job(store: DatasetStore, job: TrainJob, fingerprint: str) -> None:
    """Refuse to resume or reuse checkpoints that a differently configured job wrote."""
    layout = RunLayout(job.run)
    recorded = store.read_json(layout.job_marker(job.train_step))
    if recorded is not None and recorded.get("fingerprint") != fingerprint:
        raise ValueError(
            f"{store.uri(layout.checkpoints(job.train_step))} holds training step "
            f"{job.train_step!r} of another job or dataset (fingerprint "
            f"{recorded.get('fingerprint')}, this job {fingerprint}): "
            "use a new train_step name or delete the old checkpoints"
        )


def _load_train_dataset(job: TrainJob, store: DatasetStore) -> datasets.Dataset:
    """The training rows from storage, reduced to the columns TRL reads."""
    where = f"{job.run}/{job.dataset}"
    dataset = store.read_dataset(job.run, *job.dataset, _RECORD_TYPES[job.kind])
    if len(dataset) == 0:
        raise ValueError(f"training set {where} has no rows")
    missing = [c for c in _TRL_COLUMNS[job.kind] if c not in dataset.column_names]
    if missing:
        raise ValueError(f"training set {where} lacks column(s) {missing} needed for {job.kind}")
    return dataset.select_columns(_TRL_COLUMNS[job.kind])


def _build_trainer(
    job: TrainJob,
    dataset: datasets.Dataset,
    model_dir: Path,
    output_dir: Path,
    callbacks: list[Any],
) -> Trainer:
    """The TRL trainer for the job (DPO uses the implicit reference model: a frozen copy)."""
    import torch
    from transformers import AutoTokenizer

    use_cpu = train_on_cpu(job.device, torch.cuda.is_available())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    common = {
        "model": str(model_dir),
        "train_dataset": dataset,
        "processing_class": tokenizer,
        "callbacks": callbacks,
        "peft_config": to_lora_config(job.training),
    }
    if job.kind == "sft":
        from trl import SFTTrainer

        return SFTTrainer(args=to_sft_config(job.training, str(output_dir), use_cpu), **common)
    from trl import DPOTrainer

    return DPOTrainer(args=to_dpo_config(job.training, str(output_dir), use_cpu), **common)


def _restore_latest_checkpoint(
    job: TrainJob, store: DatasetStore, output_dir: Path, is_main: bool
) -> Path | None:
    """Download the newest synced checkpoint into `output_dir`; its local path, or None."""
    layout = RunLayout(job.run)
    steps = synced_checkpoint_steps(store.files, layout.checkpoints(job.train_step))
    if not steps:
        return None
    local = output_dir / f"checkpoint-{steps[-1]}"
    if is_main:
        # A local copy may be a half-written save from the crash: storage is the truth.
        if local.exists():
            shutil.rmtree(local)
        download_dir(store.files, layout.checkpoint(job.train_step, steps[-1]), local)
    return local


def _save_final_model(trainer: Trainer, final_dir: Path) -> None:
    """Save the trained model as a plain model directory (LoRA merged in) plus tokenizer."""
    from peft import PeftModel

    model = trainer.accelerator.unwrap_model(trainer.model)
    if isinstance(model, PeftModel):
        if trainer.accelerator.is_main_process:
            model.merge_and_unload().save_pretrained(final_dir, safe_serialization=True)
    else:
        trainer.save_model(str(final_dir))  # collective on several processes
    if trainer.accelerator.is_main_process:
        trainer.processing_class.save_pretrained(final_dir)


def _trusted_completion(store: DatasetStore, job: TrainJob) -> dict[str, Any] | None:
    """The completion record of a finished job whose final model is still whole, else None.

    Sizes are checked here (cheap, a listing); hashes when the model is read
    (`avr_core.models.resolve_model_dir`). A model that fails the check is set aside and the
    job resumes from its last synced checkpoint, which rebuilds the final model.
    """
    layout = RunLayout(job.run)
    done = store.read_json(layout.complete_marker(job.train_step))
    if done is None:
        return None
    final = layout.final_model(job.train_step)
    problems = verify_synced_dir(store.files, final, check_hashes=False)
    if not problems:
        return dict(done)
    logger.warning(
        "%s: the final model of %s is damaged (%s); retraining it from the last checkpoint",
        store.uri(final),
        job.train_step,
        "; ".join(problems),
    )
    invalidate_completion(store.files, layout.checkpoints(job.train_step), "; ".join(problems))
    return None


def tokens_seen(log_history: list[dict[str, Any]]) -> int | None:
    """Training tokens TRL counted (its `num_tokens` log: the non-padding tokens of every batch,
    from this attempt's start, so a resumed run counts from its checkpoint); None if not logged."""
    counts = [entry["num_tokens"] for entry in log_history if "num_tokens" in entry]
    return int(counts[-1]) if counts else None


def trained_counts(completion: dict[str, Any] | None) -> dict[str, int | None]:
    """`global_step` and `tokens_seen` from a training step's completion record (None each when
    the record predates them)."""
    record = completion or {}
    return {name: record.get(name) for name in ("global_step", "tokens_seen")}


def train(job: TrainJob, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train (or resume) the job; returns the completion record (with `final_uri`).

    `storage_options` (credentials) come from the caller's settings, never from the job file.
    """
    if not job.work_dir:
        raise ValueError("TrainJob.work_dir is empty: give the trainer a scratch directory")
    store = DatasetStore(job.store_root, storage_options)
    layout = RunLayout(job.run)
    final_uri = store.uri(layout.final_model(job.train_step))
    fingerprint = job.fingerprint(_dataset_identity(store, job))
    _check_same_job(store, job, fingerprint)
    done = _trusted_completion(store, job)
    if done is not None:
        return done

    dataset = _load_train_dataset(job, store)
    cache = Path(job.cache_dir) if job.cache_dir else None
    model_dir = resolve_model_dir(job.base_model, storage_options, cache)
    work_dir = Path(job.work_dir)
    output_dir = work_dir / "trainer"
    start_recorder = _make_start_recorder()
    callbacks = [_make_sync_callback(store, layout.checkpoints(job.train_step)), start_recorder]
    if job.crash_after_step_for_tests is not None:
        callbacks.append(_make_crash_callback(job.crash_after_step_for_tests))
    trainer = _build_trainer(job, dataset, model_dir, output_dir, callbacks)
    accelerator = trainer.accelerator

    if accelerator.is_main_process:
        recorded_job = job.model_dump(mode="json")
        store.write_json(
            layout.job_marker(job.train_step), {"fingerprint": fingerprint, "job": recorded_job}
        )
    resume = _restore_latest_checkpoint(job, store, output_dir, accelerator.is_main_process)
    accelerator.wait_for_everyone()
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)

    final_dir = work_dir / "final"
    if accelerator.is_main_process and final_dir.exists():
        shutil.rmtree(final_dir)
    _save_final_model(trainer, final_dir)
    summary = {
        "final_uri": final_uri,
        "fingerprint": fingerprint,
        "kind": job.kind,
        "base_model": job.base_model,
        "dataset": f"{job.run}/{job.dataset}",
        "rows": len(dataset),
        "resumed_from_step": checkpoint_step(resume.name) if resume else None,
        "start_global_step": start_recorder.start_global_step,
        "global_step": trainer.state.global_step,
        "tokens_seen": tokens_seen(trainer.state.log_history),
        "train_loss": result.training_loss,
        "completed_at": datetime.now(UTC).isoformat(),
    }
    if accelerator.is_main_process:
        upload_dir(store.files, final_dir, layout.final_model(job.train_step))
        # The files' hashes name this model's weights: a model retrained under the same
        # fingerprint (after a loss) gets another revision, so data generated with it differs.
        files = read_sync_marker(store.files, layout.final_model(job.train_step)) or {}
        summary["files"] = files
        summary["revision"] = short_hash({"fingerprint": fingerprint, "files": files})
        # Written last: its presence means the final model in storage is whole.
        store.write_json(layout.complete_marker(job.train_step), summary)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        # Everything worth keeping is in storage now. Local checkpoints (GBs each with optimizer
        # state) would otherwise pile up on the worker's disk run after run.
        shutil.rmtree(work_dir, ignore_errors=True)
    return summary


# --------------------------------------------------------------------------------------------
# Process isolation
# --------------------------------------------------------------------------------------------


def training_command(job_path: str, result_path: str, num_gpus: int) -> list[str]:
    """The command line that trains the job in a fresh process (one per GPU on several GPUs)."""
    module = ["-m", "avr_core.training", job_path, result_path]
    if num_gpus > 1:
        return [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--num_processes",
            str(num_gpus),
            *module,
        ]
    return [sys.executable, *module]


_JOB_DIR_PREFIX = "avr-train-"
_WORK_DIR_PREFIX = "train-"
# How the parent hands the child its storage credentials: the environment, never the job file.
STORAGE_OPTIONS_ENV = "AVR_STORAGE_OPTIONS"


def run_training_subprocess(
    job: TrainJob,
    num_gpus: int,
    env: dict[str, str] | None = None,
    storage_options: dict[str, Any] | None = None,
    work_root: Path | None = None,
) -> str:
    """Train in a child process (never in one holding a vLLM engine); return the final URI.

    `env` is the child's environment (default: this process's); `storage_options` reach the
    child through it. With `work_root`, the trainer's scratch is a fresh directory there, unique
    to this attempt; scratch and job directories of dead processes are removed first.
    """
    temp_root = Path(tempfile.gettempdir())
    remove_abandoned_dirs(temp_root, _JOB_DIR_PREFIX)
    if work_root is not None:
        remove_abandoned_dirs(work_root, _WORK_DIR_PREFIX)
        job = job.model_copy(update={"work_dir": str(claim_dir(work_root, _WORK_DIR_PREFIX))})
    job_dir = claim_dir(temp_root, _JOB_DIR_PREFIX)
    try:
        job_path = job_dir / "job.json"
        result_path = job_dir / "result.json"
        # 0600 from the start (the directory is 0700 too): nobody else reads the job.
        descriptor = os.open(job_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            handle.write(job.model_dump_json(indent=2))
        child_env = dict(os.environ if env is None else env)
        child_env[STORAGE_OPTIONS_ENV] = json.dumps(storage_options or {})
        # SIGTERM when this process dies: a killed worker leaves no orphan trainer writing
        # checkpoints beside the next attempt. This thread waits for the child, as Linux needs.
        command = die_with_parent(training_command(str(job_path), str(result_path), num_gpus))
        tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
        # stderr is merged so the tail shows the traceback in order with the trainer's logs.
        with subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            env=child_env,
        ) as process:
            assert process.stdout is not None
            for line in process.stdout:
                sys.stdout.write(line)
                tail.append(line)
            returncode = process.wait()
        if returncode != 0:
            raise TrainingFailedError(
                f"training {job.train_step!r} ({job.kind}) exited with code {returncode}; "
                f"last output:\n{''.join(tail)}"
            )
        if not result_path.exists():
            raise TrainingFailedError(
                f"training {job.train_step!r} exited cleanly but wrote no result file"
            )
        return str(json.loads(result_path.read_text())["final_uri"])
    finally:
        shutil.rmtree(job_dir, ignore_errors=True)
        if work_root is not None:
            # Whatever is worth keeping was synced to storage; a killed attempt's scratch is
            # removed by the next one (remove_abandoned_dirs above).
            shutil.rmtree(job.work_dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """`python -m avr_core.training JOB.json RESULT.json`: train the job, report its result."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m avr_core.training JOB.json RESULT.json", file=sys.stderr)
        return 2
    job = TrainJob.model_validate_json(Path(args[0]).read_text())
    # This process is an edge: its settings (credentials) come from the environment.
    summary = train(job, AvrSettings().storage_options)
    # Under `accelerate launch` every rank runs this; train() returns the same record on each,
    # and the file is written whole by a rename, so concurrent writers cannot tear it.
    temp = Path(args[1]).with_suffix(f".tmp-{os.getpid()}")
    temp.write_text(json.dumps(summary, indent=2, sort_keys=True))
    temp.replace(args[1])
    print(f"final model: {summary['final_uri']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

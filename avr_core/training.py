"""SFT and DPO training with TRL, in its own process, with checkpoints synced to storage.

`train(job)` reads the dataset straight from storage, trains with TRL, uploads every trainer
checkpoint to `{checkpoint_uri}/checkpoint-N` as it is saved, and resumes from the latest uploaded
checkpoint when the same job is started again (on any machine). The final model, LoRA merged in,
goes to `{checkpoint_uri}/final`; `{checkpoint_uri}/_complete.json`, written last, makes a re-run
return it without training.

Training never runs in the process that holds a vLLM engine (DESIGN section 6):
`run_training_subprocess(job)` launches `python -m avr_core.training JOB.json` (or
`accelerate launch` on several GPUs) and returns the final URI the child reports.
`trl`, `peft` and `torch` are imported inside functions so that `import avr_core.training` works
without them.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from avr_core.config import TrainingConfig
from avr_core.models import TINY_MODEL, resolve_model_dir
from avr_core.schemas import PreferencePair, SFTExample

if TYPE_CHECKING:
    import datasets
    import peft
    import trl
    from transformers import TrainerCallback

__all__ = [
    "TrainJob",
    "TrainingFailedError",
    "run_training_subprocess",
    "to_dpo_config",
    "to_lora_config",
    "to_sft_config",
    "train",
    "training_command",
    "visible_cuda_devices",
]

FINAL_DIR_NAME = "final"
COMPLETE_MARKER = "_complete.json"
JOB_MARKER = "_job.json"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")

# The columns TRL reads; the rest (prompt_id, kind, scores, lineage) would reach its collator.
_TRL_COLUMNS = {"sft": ["messages"], "dpo": ["prompt", "chosen", "rejected"]}
_RECORD_TYPES = {"sft": SFTExample, "dpo": PreferencePair}

# TrainingConfig fields the adapter maps itself: setting them in `extra` too would be ambiguous.
_MAPPED_FIELDS = {
    "output_dir",
    "learning_rate",
    "num_train_epochs",
    "max_steps",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "max_length",
    "save_steps",
    "save_strategy",
    "seed",
    "use_cpu",
    "beta",
    "loss_type",
}


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
    storage_options: dict[str, Any] = Field(default_factory=dict)
    run: str
    dataset_stage: str = Field(description="stage holding the training set, e.g. 'stage1'")
    dataset_step: str = Field(description="step holding the training set, e.g. 'rsft'")
    train_step: str = Field(description="name of this training step, e.g. 'stage1_sft'")
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    work_dir: str = Field(description="local scratch directory for trainer checkpoints")
    fail_after_step: int | None = Field(
        None,
        description="tests only: crash the process after this optimizer step (simulates a kill)",
    )

    def fingerprint(self, dataset_identity: str = "") -> str:
        """Hash of what determines the trained model; execution details and test hooks excluded.

        `dataset_identity` names the dataset's contents (see `_dataset_identity`), so a training
        set regenerated under the same step name is not mistaken for the one trained on.
        """
        content = self.model_dump(
            mode="json", include={"kind", "base_model", "run", "dataset_stage", "dataset_step"}
        )
        content["training"] = self.training.model_dump(mode="json")
        content["dataset_identity"] = dataset_identity
        blob = json.dumps(content, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# Config adapter: our TrainingConfig -> TRL's SFTConfig / DPOConfig / peft LoraConfig
# --------------------------------------------------------------------------------------------


def _bf16_supported(use_cpu: bool) -> bool:
    """bf16 mixed precision only on a CUDA device that has it (TRL's default bf16 fails on CPU)."""
    if use_cpu:
        return False
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def _common_args(cfg: TrainingConfig, output_dir: str, use_cpu: bool) -> dict[str, Any]:
    """Arguments shared by SFTConfig and DPOConfig."""
    return {
        "output_dir": output_dir,
        "learning_rate": cfg.learning_rate,
        "num_train_epochs": cfg.num_train_epochs,
        "max_steps": cfg.max_steps,
        "per_device_train_batch_size": cfg.per_device_train_batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "max_length": cfg.max_length,
        "save_strategy": "steps",
        "save_steps": cfg.save_steps,
        "seed": cfg.seed,
        "use_cpu": use_cpu,
        "bf16": _bf16_supported(use_cpu),
        "logging_steps": 1,
        "report_to": "none",
    }


def _apply_extra(args: dict[str, Any], extra: dict[str, Any], config_cls: type) -> dict[str, Any]:
    """Overlay `extra` on the mapped arguments, refusing keys TRL's config does not have."""
    known = {f.name for f in dataclasses.fields(config_cls) if f.init}
    for key in extra:
        if key not in known:
            raise ValueError(
                f"TrainingConfig.extra key {key!r} is not a field of trl.{config_cls.__name__}"
            )
        if key in _MAPPED_FIELDS:
            raise ValueError(
                f"TrainingConfig.extra key {key!r} is set by the adapter: "
                "use the TrainingConfig field of that name instead"
            )
    return {**args, **extra}


def to_sft_config(cfg: TrainingConfig, output_dir: str, use_cpu: bool) -> trl.SFTConfig:
    """TRL's SFTConfig for our TrainingConfig (DPO-only fields ignored, `extra` passed through)."""
    from trl import SFTConfig

    args = _apply_extra(_common_args(cfg, output_dir, use_cpu), cfg.extra, SFTConfig)
    return SFTConfig(**args)


def to_dpo_config(cfg: TrainingConfig, output_dir: str, use_cpu: bool) -> trl.DPOConfig:
    """TRL's DPOConfig for our TrainingConfig, with beta and the (possibly combined) loss types."""
    from trl import DPOConfig

    args = _common_args(cfg, output_dir, use_cpu)
    args.update(beta=cfg.beta, loss_type=list(cfg.loss_type))
    return DPOConfig(**_apply_extra(args, cfg.extra, DPOConfig))


def to_lora_config(cfg: TrainingConfig) -> peft.LoraConfig | None:
    """A LoRA adapter over all linear layers when `use_lora`, else None (full fine-tuning)."""
    if not cfg.use_lora:
        return None
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )


# --------------------------------------------------------------------------------------------
# Storage: checkpoint URIs, sync and markers
# --------------------------------------------------------------------------------------------


def _open_store(job: TrainJob):
    """The job's DatasetStore."""
    from avr_core.storage import DatasetStore

    return DatasetStore(job.store_root, storage_options=job.storage_options or None)


def _filesystem(uri: str, storage_options: dict[str, Any]):
    """fsspec filesystem and path for `uri` (listing and small markers; the store has no list)."""
    import fsspec

    return fsspec.core.url_to_fs(uri, **storage_options)


def _join(uri: str, *parts: str) -> str:
    """`uri/part/...` without doubled slashes."""
    return "/".join([uri.rstrip("/"), *parts])


def _relative_to_root(store, uri: str) -> str:
    """`uri` as a path relative to the store root (what write_json/read_json take)."""
    prefix = store.root.rstrip("/") + "/"
    if not uri.startswith(prefix):
        raise ValueError(f"{uri!r} is outside the store root {store.root!r}")
    return uri[len(prefix) :]


def _write_marker(store, uri: str, obj: dict[str, Any]) -> None:
    """Write a small JSON file at `uri` atomically (what marks a step as finished)."""
    store.write_json(_relative_to_root(store, uri), obj)


def _read_marker(store, uri: str) -> dict[str, Any] | None:
    """The JSON at `uri`, or None when it does not exist."""
    return store.read_json(_relative_to_root(store, uri))


def _synced_checkpoint_steps(checkpoint_uri: str, storage_options: dict[str, Any]) -> list[int]:
    """Global steps of the checkpoints fully uploaded under `checkpoint_uri`, ascending."""
    from avr_core.storage import SYNC_MARKER_NAME

    fs, root = _filesystem(checkpoint_uri, storage_options)
    # The crashed run wrote here through another process: drop fsspec's cached listings.
    fs.invalidate_cache(root)
    if not fs.exists(root):
        return []
    steps = []
    for entry in fs.ls(root, detail=False):
        match = _CHECKPOINT_RE.match(entry.rstrip("/").rsplit("/", 1)[-1])
        # A checkpoint without upload_dir's marker was cut off mid-upload: not resumable.
        if match and fs.exists(_join(entry, SYNC_MARKER_NAME)):
            steps.append(int(match.group(1)))
    return sorted(steps)


def _dataset_identity(store, job: TrainJob) -> str:
    """Hash of the training set's shard hashes from its manifest ("" for an unsealed step)."""
    manifest = store.read_manifest(job.run, job.dataset_stage, job.dataset_step)
    if manifest is None:
        return ""
    digests = [shard.sha256 for shard in sorted(manifest.shards, key=lambda s: s.index)]
    return hashlib.sha256(",".join(digests).encode()).hexdigest()[:16]


def _check_same_job(store, job: TrainJob, checkpoint_uri: str, fingerprint: str) -> None:
    """Refuse to resume or reuse checkpoints that a differently configured job wrote."""
    recorded = _read_marker(store, _join(checkpoint_uri, JOB_MARKER))
    if recorded is not None and recorded.get("fingerprint") != fingerprint:
        raise ValueError(
            f"{checkpoint_uri} holds training step {job.train_step!r} of another job or "
            f"dataset (fingerprint {recorded.get('fingerprint')}, this job {fingerprint}): "
            "use a new train_step name or delete the old checkpoints"
        )


def _make_sync_callback(store, checkpoint_uri: str):
    """A TrainerCallback that uploads each saved checkpoint, then marks it synced."""
    from transformers import TrainerCallback

    class SyncCheckpointCallback(TrainerCallback):
        """After every checkpoint save, copy `checkpoint-N` to storage (main process only)."""

        def on_save(self, args, state, control, **kwargs):
            # Other ranks write their own RNG files into the checkpoint: wait until all are done.
            if args.world_size > 1:
                from accelerate import PartialState

                PartialState().wait_for_everyone()
            if state.is_world_process_zero:
                name = f"checkpoint-{state.global_step}"
                remote = _join(checkpoint_uri, name)
                # upload_dir writes its sync marker last: a cut-off upload never looks complete.
                store.upload_dir(Path(args.output_dir) / name, remote)
            return control

    return SyncCheckpointCallback()


def _make_start_recorder() -> TrainerCallback:
    """A callback that notes the global step training (re)starts from (the resume evidence)."""
    from transformers import TrainerCallback

    class StartStepRecorder(TrainerCallback):
        start_global_step: int | None = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.start_global_step = state.global_step
            return control

    return StartStepRecorder()


def _make_crash_callback(fail_after_step: int) -> TrainerCallback:
    """A callback that kills training after `fail_after_step` steps (tests of resume)."""
    from transformers import TrainerCallback

    class CrashAfterStepCallback(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            # on_step_end runs before that step's checkpoint save: crash one step later than a save.
            if state.global_step >= fail_after_step:
                raise RuntimeError(f"fail_after_step={fail_after_step}: crashing on purpose")
            return control

    return CrashAfterStepCallback()


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def _load_train_dataset(job: TrainJob, store) -> datasets.Dataset:
    """The training rows from storage, reduced to the columns TRL reads."""
    dataset = store.read_dataset(
        job.run, job.dataset_stage, job.dataset_step, _RECORD_TYPES[job.kind]
    )
    if len(dataset) == 0:
        raise ValueError(
            f"training set {job.run}/{job.dataset_stage}/{job.dataset_step} has no rows"
        )
    missing = [c for c in _TRL_COLUMNS[job.kind] if c not in dataset.column_names]
    if missing:
        raise ValueError(
            f"training set {job.run}/{job.dataset_stage}/{job.dataset_step} lacks column(s) "
            f"{missing} needed for {job.kind}"
        )
    return dataset.select_columns(_TRL_COLUMNS[job.kind])


def _build_trainer(job: TrainJob, dataset, model_dir: Path, output_dir: Path, callbacks: list):
    """The TRL trainer for the job (DPO uses the implicit reference model: a frozen copy)."""
    import torch
    from transformers import AutoTokenizer

    use_cpu = not torch.cuda.is_available()
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


def _restore_latest_checkpoint(job: TrainJob, store, output_dir: Path, is_main: bool):
    """Download the newest synced checkpoint into `output_dir`; its local path, or None."""
    checkpoint_uri = store.checkpoint_uri(job.run, job.train_step)
    steps = _synced_checkpoint_steps(checkpoint_uri, job.storage_options)
    if not steps:
        return None
    local = output_dir / f"checkpoint-{steps[-1]}"
    if is_main:
        # A local copy may be a half-written save from the crash: storage is the truth.
        if local.exists():
            shutil.rmtree(local)
        store.download_dir(_join(checkpoint_uri, local.name), local)
    return local


def _save_final_model(trainer, tokenizer, final_dir: Path) -> None:
    """Save the trained model as a plain model directory (LoRA merged in) plus tokenizer."""
    from peft import PeftModel

    model = trainer.accelerator.unwrap_model(trainer.model)
    if isinstance(model, PeftModel):
        if trainer.accelerator.is_main_process:
            model.merge_and_unload().save_pretrained(final_dir, safe_serialization=True)
    else:
        trainer.save_model(str(final_dir))  # collective on several processes
    if trainer.accelerator.is_main_process:
        tokenizer.save_pretrained(final_dir)


def train(job: TrainJob) -> str:
    """Train (or resume) the job and return the storage URI of the final model."""
    store = _open_store(job)
    checkpoint_uri = store.checkpoint_uri(job.run, job.train_step)
    final_uri = _join(checkpoint_uri, FINAL_DIR_NAME)
    fingerprint = job.fingerprint(_dataset_identity(store, job))
    _check_same_job(store, job, checkpoint_uri, fingerprint)
    done = _read_marker(store, _join(checkpoint_uri, COMPLETE_MARKER))
    if done is not None:
        _write_result(done)
        return done["final_uri"]

    dataset = _load_train_dataset(job, store)
    model_dir = resolve_model_dir(job.base_model, job.storage_options or None)
    work_dir = Path(job.work_dir)
    output_dir = work_dir / "trainer"
    start_recorder = _make_start_recorder()
    callbacks = [_make_sync_callback(store, checkpoint_uri), start_recorder]
    if job.fail_after_step is not None:
        callbacks.append(_make_crash_callback(job.fail_after_step))
    trainer = _build_trainer(job, dataset, model_dir, output_dir, callbacks)
    accelerator = trainer.accelerator

    if accelerator.is_main_process:
        # storage_options may hold credentials: never write them to storage.
        recorded_job = job.model_dump(mode="json", exclude={"storage_options"})
        _write_marker(
            store,
            _join(checkpoint_uri, JOB_MARKER),
            {"fingerprint": fingerprint, "job": recorded_job},
        )
    resume = _restore_latest_checkpoint(job, store, output_dir, accelerator.is_main_process)
    accelerator.wait_for_everyone()
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)

    final_dir = work_dir / FINAL_DIR_NAME
    if accelerator.is_main_process and final_dir.exists():
        shutil.rmtree(final_dir)
    _save_final_model(trainer, trainer.processing_class, final_dir)
    summary = {
        "final_uri": final_uri,
        "fingerprint": fingerprint,
        "kind": job.kind,
        "base_model": job.base_model,
        "dataset": f"{job.run}/{job.dataset_stage}/{job.dataset_step}",
        "rows": len(dataset),
        "resumed_from_step": _step_of(resume),
        "start_global_step": start_recorder.start_global_step,
        "global_step": trainer.state.global_step,
        "train_loss": result.training_loss,
        "completed_at": datetime.now(UTC).isoformat(),
    }
    if accelerator.is_main_process:
        store.upload_dir(final_dir, final_uri)
        # Written last: its presence means the final model in storage is whole.
        _write_marker(store, _join(checkpoint_uri, COMPLETE_MARKER), summary)
        _write_result(summary)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        # Everything worth keeping is in storage now. Local checkpoints (GBs each with optimizer
        # state) would otherwise pile up on the worker's disk run after run.
        shutil.rmtree(work_dir, ignore_errors=True)
    return final_uri


def _step_of(checkpoint: Path | None) -> int | None:
    """Global step encoded in a `checkpoint-N` directory name."""
    if checkpoint is None:
        return None
    return int(_CHECKPOINT_RE.match(checkpoint.name).group(1))


# --------------------------------------------------------------------------------------------
# Process isolation
# --------------------------------------------------------------------------------------------

_RESULT_ENV = "AVR_TRAIN_RESULT"
_TAIL_LINES = 60


def _write_result(summary: dict[str, Any]) -> None:
    """Hand the summary to the launching process through the file it named, if any."""
    path = os.environ.get(_RESULT_ENV)
    # Under `accelerate launch` every rank runs this module; only rank 0 reports.
    if path and os.environ.get("RANK", "0") == "0":
        Path(path).write_text(json.dumps(summary, indent=2, sort_keys=True))


def visible_cuda_devices() -> int:
    """Number of CUDA GPUs a child would see, found without initialising CUDA in this process."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    nvidia_smi = shutil.which("nvidia-smi")
    if nvidia_smi is None:
        return 0
    try:
        listing = subprocess.run(
            [nvidia_smi, "-L"], capture_output=True, text=True, timeout=30, check=True
        ).stdout
    except (subprocess.SubprocessError, OSError):
        return 0
    return sum(1 for line in listing.splitlines() if line.startswith("GPU "))


def training_command(job_path: str, num_gpus: int) -> list[str]:
    """The command line that trains the job in a fresh process (one per GPU on several GPUs)."""
    if num_gpus > 1:
        return [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--num_processes",
            str(num_gpus),
            "-m",
            "avr_core.training",
            job_path,
        ]
    return [sys.executable, "-m", "avr_core.training", job_path]


def run_training_subprocess(job: TrainJob, num_gpus: int | None = None) -> str:
    """Train in a child process (never in one holding a vLLM engine); return the final URI."""
    gpus = visible_cuda_devices() if num_gpus is None else num_gpus
    with tempfile.TemporaryDirectory(prefix="avr-train-") as tmp:
        job_path = Path(tmp) / "job.json"
        result_path = Path(tmp) / "result.json"
        job_path.write_text(job.model_dump_json(indent=2))
        env = {**os.environ, _RESULT_ENV: str(result_path)}
        command = training_command(str(job_path), gpus)
        tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
        # stderr is merged so the tail shows the traceback in order with the trainer's logs.
        with subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            env=env,
        ) as process:
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
        return json.loads(result_path.read_text())["final_uri"]


def main(argv: list[str] | None = None) -> int:
    """`python -m avr_core.training JOB.json`: train the job described by the JSON file."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m avr_core.training JOB.json", file=sys.stderr)
        return 2
    job = TrainJob.model_validate_json(Path(args[0]).read_text())
    print(f"final model: {train(job)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Training: the TrainingConfig -> TRL adapter, and real SFT/DPO runs of the tiny model on CPU.

The slow tests train SmolLM2-135M for a few steps from datasets in a file:// store, compare a
weight tensor before and after, and crash a training process on purpose to show that a re-run on a
fresh work directory resumes from the checkpoint synced to storage.
"""

from __future__ import annotations

import dataclasses
import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from avr_core.config import DPO_LOSS_TYPES, TrainingConfig
from avr_core.devices import train_on_cpu, visible_cuda_devices
from avr_core.layout import COMPLETE_MARKER
from avr_core.models import TINY_MODEL, resolve_model_dir
from avr_core.schemas import Lineage, Message, PreferencePair, SFTExample
from avr_core.training import (
    TrainingFailedError,
    TrainJob,
    run_training_subprocess,
    train,
    training_command,
)
from avr_core.trl_config import to_dpo_config, to_lora_config, to_sft_config

RUN = "test-run"
PROBE_PARAMETER = "model.layers.0.mlp.down_proj.weight"

# --------------------------------------------------------------------------------------------
# Adapter (fast)
# --------------------------------------------------------------------------------------------


def test_sft_config_maps_every_field(tmp_path):
    cfg = TrainingConfig(
        learning_rate=3e-5,
        num_train_epochs=2,
        max_steps=7,
        per_device_train_batch_size=3,
        gradient_accumulation_steps=4,
        max_length=200,
        save_steps=5,
        seed=11,
    )
    sft = to_sft_config(cfg, str(tmp_path), use_cpu=True)
    assert sft.output_dir == str(tmp_path)
    assert sft.learning_rate == 3e-5
    assert sft.num_train_epochs == 2
    assert sft.max_steps == 7
    assert sft.per_device_train_batch_size == 3
    assert sft.gradient_accumulation_steps == 4
    assert sft.max_length == 200
    assert sft.save_strategy == "steps"
    assert sft.save_steps == 5
    assert sft.seed == 11
    assert sft.report_to == []
    # TRL defaults to bf16, which fails on a CPU.
    assert sft.use_cpu is True
    assert sft.bf16 is False


def test_dpo_config_maps_beta_and_combined_losses(tmp_path):
    cfg = TrainingConfig(
        beta=0.25,
        loss_type=["sigmoid", "sft"],
        max_length=128,
        extra={"loss_weights": [1.0, 0.5]},
    )
    dpo = to_dpo_config(cfg, str(tmp_path), use_cpu=True)
    assert dpo.beta == 0.25
    assert dpo.loss_type == ["sigmoid", "sft"]
    assert dpo.loss_weights == [1.0, 0.5]
    assert dpo.max_length == 128
    assert dpo.bf16 is False


def test_extra_passes_through_and_overrides_adapter_defaults(tmp_path):
    cfg = TrainingConfig(extra={"warmup_steps": 3, "logging_steps": 5, "save_total_limit": 2})
    sft = to_sft_config(cfg, str(tmp_path), use_cpu=True)
    assert sft.warmup_steps == 3
    assert sft.logging_steps == 5
    assert sft.save_total_limit == 2


def test_unknown_extra_key_is_named(tmp_path):
    cfg = TrainingConfig(extra={"warmup_stepz": 3})
    with pytest.raises(ValueError, match="'warmup_stepz'.*SFTConfig"):
        to_sft_config(cfg, str(tmp_path), use_cpu=True)


def test_dpo_only_extra_key_is_refused_for_sft(tmp_path):
    cfg = TrainingConfig(extra={"loss_weights": [1.0]})
    assert to_dpo_config(cfg, str(tmp_path), use_cpu=True).loss_weights == [1.0]
    with pytest.raises(ValueError, match="'loss_weights'.*SFTConfig"):
        to_sft_config(cfg, str(tmp_path), use_cpu=True)


def test_extra_cannot_shadow_a_training_config_field(tmp_path):
    cfg = TrainingConfig(extra={"learning_rate": 1.0})
    with pytest.raises(ValueError, match="'learning_rate'.*TrainingConfig field"):
        to_sft_config(cfg, str(tmp_path), use_cpu=True)


def test_lora_config_only_when_enabled():
    assert to_lora_config(TrainingConfig()) is None
    lora = to_lora_config(TrainingConfig(use_lora=True, lora_r=4, lora_alpha=8))
    assert lora.r == 4
    assert lora.lora_alpha == 8
    assert lora.target_modules == "all-linear"


def test_training_command_uses_accelerate_on_several_gpus():
    module = ["-m", "avr_core.training", "job.json", "result.json"]
    assert training_command("job.json", "result.json", 1)[1:] == module
    multi = training_command("job.json", "result.json", 4)
    assert multi[1:3] == ["-m", "accelerate.commands.launch"]
    assert multi[multi.index("--num_processes") + 1] == "4"
    assert multi[-4:] == module


def test_execution_device_reaches_the_trainer():
    # `execution.device: cpu` must keep training on the CPU even where CUDA is available.
    assert train_on_cpu("cpu", cuda_available=True)
    assert not train_on_cpu("auto", cuda_available=True)
    assert train_on_cpu("auto", cuda_available=False)
    assert not train_on_cpu("cuda", cuda_available=True)
    with pytest.raises(RuntimeError, match="no CUDA device"):
        train_on_cpu("cuda", cuda_available=False)


def test_visible_cuda_devices_counts_the_given_list():
    assert visible_cuda_devices("0,1") == 2
    assert visible_cuda_devices("") == 0
    assert visible_cuda_devices("-1") == 0


def test_fingerprint_ignores_execution_details(tmp_path):
    job = _job("sft", f"file://{tmp_path}", tmp_path / "a", TrainingConfig())
    moved = job.model_copy(
        update={"work_dir": str(tmp_path / "b"), "crash_after_step_for_tests": 3, "device": "cpu"}
    )
    assert moved.fingerprint() == job.fingerprint()
    retuned = job.model_copy(update={"training": TrainingConfig(learning_rate=1e-3)})
    assert retuned.fingerprint() != job.fingerprint()


# --------------------------------------------------------------------------------------------
# Real training (slow)
# --------------------------------------------------------------------------------------------

_TOPICS = ["the moon", "bread", "rivers", "chess", "autumn", "bicycles"]


def _sft_examples() -> list[SFTExample]:
    return [
        SFTExample(
            prompt_id=f"p{i}",
            kind="refinement",
            messages=[
                Message(role="user", content=f"Write one sentence about {topic}."),
                Message(role="assistant", content=f"Here is a careful sentence about {topic}."),
            ],
            lineage=Lineage(run=RUN, stage="stage1", step="rsft"),
        )
        for i, topic in enumerate(_TOPICS)
    ]


def _preference_pairs() -> list[PreferencePair]:
    return [
        PreferencePair(
            prompt_id=f"p{i}",
            kind="generation",
            prompt=[Message(role="user", content=f"Describe {topic} briefly.")],
            chosen=[Message(role="assistant", content=f"{topic.capitalize()} is worth a look.")],
            rejected=[Message(role="assistant", content="No.")],
            chosen_score=1.0,
            rejected_score=-1.0,
            lineage=Lineage(run=RUN, stage="stage1", step="dpo_pairs"),
        )
        for i, topic in enumerate(_TOPICS)
    ]


def _write_dataset(root: str, step: str, records: list, record_type: type) -> None:
    """Write records as one shard + manifest through the real DatasetStore."""
    from avr_core.storage import DatasetStore

    store = DatasetStore(root)
    store.write_shard(RUN, "stage1", step, 0, records, record_type, fingerprint="test")
    store.write_manifest(RUN, "stage1", step, record_type, fingerprint="test")


@pytest.fixture
def store_root(tmp_path) -> str:
    root = f"file://{tmp_path / 'store'}"
    _write_dataset(root, "rsft", _sft_examples(), SFTExample)
    _write_dataset(root, "dpo_pairs", _preference_pairs(), PreferencePair)
    return root


def _job(kind: str, store_root: str, work_dir: Path, training: TrainingConfig, **kw) -> TrainJob:
    return TrainJob(
        kind=kind,
        base_model=TINY_MODEL,
        store_root=store_root,
        run=RUN,
        dataset_stage="stage1",
        dataset_step="rsft" if kind == "sft" else "dpo_pairs",
        train_step=f"stage1_{kind}",
        training=training,
        work_dir=str(work_dir),
        device="cpu",
        **kw,
    )


def _tiny_training(**overrides) -> TrainingConfig:
    settings = {
        "learning_rate": 1e-4,
        "max_steps": 2,
        "per_device_train_batch_size": 2,
        "max_length": 128,
        # No checkpoint unless a test asks: a full one is 1.5 GB of model + optimizer state.
        "save_steps": 100,
        # Activation checkpointing only costs time at this size.
        "extra": {"activation_checkpointing": False},
    }
    return TrainingConfig(**{**settings, **overrides})


def _probe(model_dir: str | Path) -> torch.Tensor:
    """One weight tensor of a saved model, read without building the model."""
    from safetensors import safe_open

    with safe_open(str(Path(model_dir) / "model.safetensors"), framework="pt") as handle:
        # A copy: a tensor mapped from the file would fault if a test then damages the file.
        return handle.get_tensor(PROBE_PARAMETER).clone()


def _local(uri: str) -> Path:
    assert uri.startswith("file://"), uri
    return Path(uri.removeprefix("file://"))


def _complete_marker(final_uri: str) -> dict:
    return json.loads((_local(final_uri).parent / COMPLETE_MARKER).read_text())


@pytest.mark.slow
def test_sft_changes_weights_and_rerun_is_idempotent(store_root, tmp_path):
    before = _probe(resolve_model_dir(TINY_MODEL))
    job = _job("sft", store_root, tmp_path / "work", _tiny_training(save_steps=2))
    final_uri = train(job)["final_uri"]

    assert final_uri.endswith("/checkpoints/stage1_sft/final")
    after = _probe(_local(final_uri))
    assert not torch.equal(before, after)
    marker = _complete_marker(final_uri)
    assert marker["global_step"] == 2
    assert marker["tokens_seen"] > 0  # TRL's count of the non-padding tokens trained on
    assert marker["rows"] == len(_TOPICS)
    assert marker["resumed_from_step"] is None
    checkpoints = _local(final_uri).parent
    assert (checkpoints / "checkpoint-2" / "trainer_state.json").is_file()
    assert (checkpoints / "checkpoint-2" / "optimizer.pt").is_file()
    assert not (tmp_path / "work").exists(), "the local work dir is removed once all is in storage"

    # The final model is a plain, loadable model directory with its tokenizer.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(resolve_model_dir(final_uri))
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir(final_uri))
    assert torch.equal(model.state_dict()[PROBE_PARAMETER], after)
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)

    # Same job again (even from another work dir): the stored model comes back, no retraining.
    again = train(job.model_copy(update={"work_dir": str(tmp_path / "elsewhere")}))
    assert again["final_uri"] == final_uri
    assert _complete_marker(final_uri) == marker
    assert not (tmp_path / "elsewhere").exists()
    assert "model.safetensors" in marker["files"] and marker["revision"]

    # The final model truncated in storage: the marker is not trusted; the job resumes from its
    # last checkpoint (step 2 = the end) and uploads a whole model again.
    weights = _local(final_uri) / "model.safetensors"
    head = weights.read_bytes()[:4096]
    weights.unlink()  # a new file: tensors mapped from the old one stay valid
    weights.write_bytes(head)
    rebuilt = train(job.model_copy(update={"work_dir": str(tmp_path / "third")}))
    assert rebuilt["resumed_from_step"] == 2
    assert torch.equal(_probe(_local(final_uri)), after)
    assert list(checkpoints.glob("_complete.invalid-*.json"))

    # The training set regenerated under the same step: the stored model is not passed off as
    # trained on it.
    _write_dataset(store_root, "rsft", _sft_examples()[:3], SFTExample)
    with pytest.raises(ValueError, match="another job or dataset"):
        train(job)


@pytest.mark.slow
def test_dpo_changes_weights(store_root, tmp_path):
    before = _probe(resolve_model_dir(TINY_MODEL))
    training = _tiny_training(beta=0.1, loss_type=["sigmoid"])
    final_uri = train(_job("dpo", store_root, tmp_path / "work", training))["final_uri"]

    assert final_uri.endswith("/checkpoints/stage1_dpo/final")
    assert not torch.equal(before, _probe(_local(final_uri)))
    marker = _complete_marker(final_uri)
    assert marker["global_step"] == 2 and marker["tokens_seen"] > 0


@pytest.mark.slow
def test_crashed_lora_training_resumes_and_saves_a_merged_model(store_root, tmp_path):
    # LoRA keeps checkpoints small (adapter + its optimizer state), so three of them are cheap.
    before = _probe(resolve_model_dir(TINY_MODEL))
    training = _tiny_training(
        max_steps=4, save_steps=2, use_lora=True, lora_r=4, lora_alpha=8, learning_rate=1e-3
    )
    job = _job("sft", store_root, tmp_path / "first", training, crash_after_step_for_tests=3)
    with pytest.raises(TrainingFailedError, match="crashing on purpose"):
        run_training_subprocess(job, num_gpus=0)

    checkpoints = _local(store_root) / "runs" / RUN / "checkpoints" / "stage1_sft"
    assert sorted(p.name for p in checkpoints.glob("checkpoint-*")) == ["checkpoint-2"]
    assert not (checkpoints / COMPLETE_MARKER).exists()

    # A fresh work dir (another machine, say): the checkpoint can only come from storage.
    rerun = job.model_copy(
        update={"work_dir": str(tmp_path / "second"), "crash_after_step_for_tests": None}
    )
    final_uri = run_training_subprocess(rerun, num_gpus=0)

    marker = _complete_marker(final_uri)
    assert marker["resumed_from_step"] == 2
    assert marker["start_global_step"] == 2  # the trainer's own state after loading it
    assert marker["global_step"] == 4
    state = json.loads((checkpoints / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    assert sorted(p.name for p in checkpoints.glob("checkpoint-*")) == [
        "checkpoint-2",
        "checkpoint-4",
    ]
    assert (checkpoints / "checkpoint-2" / "adapter_model.safetensors").is_file()

    # The final model is a plain model with the adapter merged into full weight tensors.
    final_dir = _local(final_uri)
    assert not (final_dir / "adapter_config.json").exists()
    after = _probe(final_dir)
    assert after.shape == before.shape
    assert not torch.equal(before, after)


def test_changed_job_refuses_old_checkpoints(tmp_path):
    root = f"file://{tmp_path / 'store'}"
    ckpt = tmp_path / "store" / "runs" / RUN / "checkpoints" / "stage1_sft"
    ckpt.mkdir(parents=True)
    (ckpt / "_job.json").write_text(json.dumps({"fingerprint": "0000000000000000"}))
    job = _job("sft", root, tmp_path / "work", TrainingConfig())
    with pytest.raises(ValueError, match="another job"):
        train(job)


def test_subprocess_failure_reports_the_error(tmp_path):
    # No dataset in the store: the child fails before training and the error must reach us.
    job = _job("sft", f"file://{tmp_path / 'empty'}", tmp_path / "work", _tiny_training())
    with pytest.raises(TrainingFailedError, match="exited with code") as info:
        run_training_subprocess(job, num_gpus=0)
    assert "rsft" in str(info.value)


_FAKE_CHILD = """
import json, os, shutil, stat, sys
job_path, result_path, out = sys.argv[1], sys.argv[2], sys.argv[3]
shutil.copy(job_path, os.path.join(out, "job.json"))
with open(os.path.join(out, "seen.json"), "w") as handle:
    json.dump({"mode": stat.S_IMODE(os.stat(job_path).st_mode),
               "dir_mode": stat.S_IMODE(os.stat(os.path.dirname(job_path)).st_mode),
               "options": os.environ["AVR_STORAGE_OPTIONS"],
               "work_dir": json.load(open(job_path))["work_dir"]}, handle)
json.dump({"final_uri": "file:///final"}, open(result_path, "w"))
"""


def test_credentials_reach_the_trainer_through_its_environment_never_its_job_file(
    tmp_path, monkeypatch
):
    import tempfile

    from avr_core import training as training_module
    from avr_core.workdirs import ProcessIdentity

    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(
        training_module,
        "training_command",
        lambda job, result, gpus: [sys.executable, "-c", _FAKE_CHILD, job, result, str(out)],
    )
    # Left behind by a trainer killed with -9: its owner is a process that no longer exists.
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    stale = tmp_path / "tmp" / "avr-train-stale"
    stale.mkdir()
    (stale / "job.json").write_text('{"secret": "old"}')
    owner = ProcessIdentity(host=socket.gethostname(), pid=int(dead.stdout), pid_started="0")
    (stale / ".avr-owner.json").write_text(owner.model_dump_json())
    work_root = tmp_path / "work"

    job = _job("sft", f"file://{tmp_path / 'store'}", Path(""), TrainingConfig())
    secret = {"key": "AKIA-TEST", "secret": "s3cr3t-value"}
    assert run_training_subprocess(job, 0, storage_options=secret, work_root=work_root) == (
        "file:///final"
    )

    seen = json.loads((out / "seen.json").read_text())
    assert json.loads(seen["options"]) == secret
    assert seen["mode"] == 0o600 and seen["dir_mode"] == 0o700
    assert "s3cr3t" not in (out / "job.json").read_text()
    assert Path(seen["work_dir"]).parent == work_root  # unique scratch per attempt
    assert not stale.exists(), "a dead trainer's job directory is removed"
    assert not list((tmp_path / "tmp").glob("avr-train-*")), "and this one's after it ends"
    assert not Path(seen["work_dir"]).exists()


def test_dpo_loss_types_are_checked_when_the_config_is_built():
    from pydantic import ValidationError
    from trl import DPOConfig

    with pytest.raises(ValidationError, match="loss_type"):
        TrainingConfig(loss_type=["sigmoid", "sigmod"])
    # Our list is TRL's: every value we accept is one TRL's DPOConfig documents, and back.
    help_text = next(f for f in dataclasses.fields(DPOConfig) if f.name == "loss_type").metadata[
        "help"
    ]
    documented = set(re.findall(r"`'([a-z_]+)'`", help_text))
    assert set(DPO_LOSS_TYPES) == documented

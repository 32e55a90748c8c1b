"""The transformers backend on the tiny models: real generation and scoring, OOM batch halving."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from avr_core.config import ExecutionConfig, TransformersModel
from avr_core.engines import EngineError, UnsupportedBackendError, load_reward_model
from avr_core.engines.transformers_backend import (
    TransformersGenerator,
    TransformersRewardModel,
    is_out_of_memory,
    pick_dtype,
    run_in_batches,
)
from avr_core.models import TINY_REWARD_MODEL
from avr_core.schemas import Conversation, Message, Sampling

CONVERSATIONS: list[Conversation] = [
    [Message(role="user", content="Name one fruit.")],
    [Message(role="user", content="Write one short sentence about rain.")],
]


def _oom() -> RuntimeError:
    return RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")


# ---------------------------------------------------------------- batching logic (no model)


def test_run_in_batches_halves_on_oom_and_keeps_order(caplog: pytest.LogCaptureFixture) -> None:
    sizes: list[int] = []

    def run(batch, start):
        sizes.append(len(batch))
        if len(batch) > 2:
            raise _oom()
        return [(start + i, item) for i, item in enumerate(batch)]

    with caplog.at_level(logging.WARNING):
        out = run_in_batches(list("abcdefg"), 16, run, what="demo")
    assert out == list(enumerate("abcdefg"))
    # 16 is capped by the 7 items; halving the batch that ran: 7 -> 3 -> 1, then 1 is kept.
    assert sizes == [7, 3, 1, 1, 1, 1, 1, 1, 1]

    sizes.clear()
    assert run_in_batches(list("abcdefgh"), 8, run) == list(enumerate("abcdefgh"))
    assert sizes == [8, 4, 2, 2, 2, 2]
    assert "retrying with batch size 1" in caplog.text


def test_run_in_batches_gives_up_at_one_and_passes_other_errors() -> None:
    def always_oom(batch, start):
        raise torch.OutOfMemoryError("out of memory")

    with pytest.raises(EngineError, match="out of memory on a single conversation"):
        run_in_batches([1, 2, 3], 2, always_oom)

    def broken(batch, start):
        raise ValueError("bad input")

    with pytest.raises(ValueError, match="bad input"):
        run_in_batches([1, 2], 2, broken)


def test_is_out_of_memory() -> None:
    assert is_out_of_memory(torch.OutOfMemoryError("x"))
    assert is_out_of_memory(_oom())
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert not is_out_of_memory(MemoryError())


def test_pick_dtype_spec_overrides_and_scoring_stays_fp32_on_cpu() -> None:
    cpu = torch.device("cpu")
    assert pick_dtype(TransformersModel(dtype="float16"), cpu) == torch.float16
    assert pick_dtype(TransformersModel(), torch.device("cuda")) == torch.bfloat16
    assert pick_dtype(TransformersModel(), cpu, for_scoring=True) == torch.float32
    assert pick_dtype(TransformersModel(), cpu) in (torch.bfloat16, torch.float32)


def test_unknown_device_request_fails_clearly() -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(EngineError, match="no CUDA device"):
        TransformersGenerator(TransformersModel(), ExecutionConfig(device="cuda"))


def test_factory_rejects_unknown_backend() -> None:
    # Validation makes such a spec impossible; the factory still refuses what it cannot dispatch.
    spec = SimpleNamespace(backend="tgi", path="x")
    with pytest.raises(UnsupportedBackendError, match="unknown reward model backend 'tgi'"):
        load_reward_model(spec)  # type: ignore[arg-type]


# ---------------------------------------------------------------- generation on the tiny model


@pytest.mark.slow
def test_generate_shape_and_seed_reproducibility(tiny_generator: TransformersGenerator) -> None:
    sampling = Sampling(n=2, temperature=1.0, top_p=0.95, max_tokens=8, seed=7)
    rng_before = torch.random.get_rng_state()
    first = tiny_generator.chat(CONVERSATIONS, sampling)
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # caller's RNG untouched
    assert len(first) == 2 and all(len(group) == 2 for group in first)
    assert all(isinstance(text, str) and text for group in first for text in group)
    assert "<|im_end|>" not in "".join(t for g in first for t in g)  # special tokens stripped
    assert tiny_generator.chat(CONVERSATIONS, sampling) == first
    other_seed = tiny_generator.chat(CONVERSATIONS, sampling.model_copy(update={"seed": 8}))
    assert other_seed != first


@pytest.mark.slow
def test_greedy_is_deterministic_and_repeats_n(tiny_generator: TransformersGenerator) -> None:
    greedy = Sampling(n=3, temperature=0.0, max_tokens=8, seed=None)
    first = tiny_generator.chat(CONVERSATIONS, greedy)
    assert [len(g) for g in first] == [3, 3]
    assert all(len(set(group)) == 1 and group[0] for group in first)
    assert tiny_generator.chat(CONVERSATIONS, greedy) == first


@pytest.mark.slow
def test_generate_halves_batch_on_oom(
    tiny_generator: TransformersGenerator,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    real_generate = tiny_generator.model.generate
    batch_sizes: list[int] = []

    def generate_with_small_memory(**kwargs):
        batch_sizes.append(kwargs["input_ids"].shape[0])
        if kwargs["input_ids"].shape[0] > 1:
            raise _oom()
        return real_generate(**kwargs)

    monkeypatch.setattr(tiny_generator.model, "generate", generate_with_small_memory)
    with caplog.at_level(logging.WARNING):
        out = tiny_generator.chat(CONVERSATIONS, Sampling(n=2, max_tokens=6, seed=1))
    assert batch_sizes == [2, 1, 1]
    assert [len(g) for g in out] == [2, 2] and all(t for g in out for t in g)
    assert "retrying with batch size 1" in caplog.text

    monkeypatch.setattr(
        tiny_generator.model, "generate", lambda **kwargs: (_ for _ in ()).throw(_oom())
    )
    with pytest.raises(EngineError, match="out of memory"):
        tiny_generator.chat(CONVERSATIONS, Sampling(max_tokens=4))


# ---------------------------------------------------------------- scoring on the tiny reward model

SCORED: list[Conversation] = [
    CONVERSATIONS[0] + [Message(role="assistant", content="An apple.")],
    CONVERSATIONS[1]
    + [Message(role="assistant", content="Rain tapped softly on the window all night long.")],
    [
        Message(role="system", content="Be brief."),
        Message(role="user", content="Hi"),
        Message(role="assistant", content="Hello!"),
    ],
]


@pytest.fixture(scope="module")
def tiny_reward_model(tiny_reward_model_dir: Path) -> Iterator[TransformersRewardModel]:
    model = TransformersRewardModel(
        TransformersModel(path=TINY_REWARD_MODEL), ExecutionConfig(batch_size=2, device="cpu")
    )
    yield model
    model.close()


@pytest.mark.slow
def test_reward_scores_match_a_direct_forward(
    tiny_reward_model: TransformersRewardModel, tiny_reward_model_dir: Path
) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    assert tiny_reward_model.model_id == f"transformers:{TINY_REWARD_MODEL}"
    scores = tiny_reward_model.score(SCORED)
    assert len(scores) == 3 and all(type(s) is float for s in scores)
    assert tiny_reward_model.score(SCORED) == scores
    assert len(set(scores)) == 3

    tokenizer = AutoTokenizer.from_pretrained(tiny_reward_model_dir)
    direct = AutoModelForSequenceClassification.from_pretrained(
        tiny_reward_model_dir, dtype=torch.float32
    ).eval()
    for conversation, score in zip(SCORED, scores, strict=True):
        ids = tokenizer.apply_chat_template(
            [m.model_dump() for m in conversation],
            tokenize=True,
            return_tensors="pt",
            return_dict=True,
        )
        with torch.inference_mode():
            expected = direct(**ids).logits[0, 0].item()
        assert score == pytest.approx(expected, abs=1e-4)


@pytest.mark.slow
def test_reward_halves_batch_on_oom(
    tiny_reward_model: TransformersRewardModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    expected = tiny_reward_model.score(SCORED)
    real_forward = tiny_reward_model.model.forward
    batch_sizes: list[int] = []

    def forward_with_small_memory(*args, **kwargs):
        batch_sizes.append(kwargs["input_ids"].shape[0])
        if kwargs["input_ids"].shape[0] > 1:
            raise _oom()
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(tiny_reward_model.model, "forward", forward_with_small_memory)
    assert tiny_reward_model.score(SCORED) == pytest.approx(expected, abs=1e-4)
    assert batch_sizes == [2, 1, 1, 1]


@pytest.mark.slow
def test_model_id_is_the_spec_id_wherever_the_model_was_loaded_from(
    tiny_reward_model: TransformersRewardModel, tiny_reward_model_dir: Path, tmp_path: Path
) -> None:
    # The caller resolved a storage URI into some local directory; lineage must still record the
    # URI it asked for. The spec path does not exist here, so loading it would fail.
    elsewhere = tmp_path / "synced-copy"
    elsewhere.symlink_to(tiny_reward_model_dir, target_is_directory=True)
    spec = TransformersModel(path="s3://avr-models/runs/demo/reward/final")
    model = load_reward_model(spec, ExecutionConfig(device="cpu"), model_dir=elsewhere)
    try:
        assert model.model_id == "transformers:s3://avr-models/runs/demo/reward/final"
        assert str(elsewhere) not in model.model_id
        # ... and it really is the model in `model_dir` that scores.
        assert model.score(SCORED) == pytest.approx(tiny_reward_model.score(SCORED), abs=1e-4)
    finally:
        model.close()


@pytest.mark.slow
def test_closed_reward_model_refuses_work(tiny_reward_model_dir: Path) -> None:
    model = TransformersRewardModel(
        TransformersModel(path=str(tiny_reward_model_dir)), ExecutionConfig(device="cpu")
    )
    model.close()
    assert model.model is None
    with pytest.raises(EngineError, match="closed"):
        model.score(SCORED[:1])


# ---------------------------------------------------------------- the same engines on a GPU


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_engines_run_in_bf16(tiny_reward_model: TransformersRewardModel) -> None:
    cuda = ExecutionConfig(batch_size=4, device="cuda")
    generator = TransformersGenerator(TransformersModel(), cuda)
    assert generator.model.dtype == torch.bfloat16
    out = generator.chat(CONVERSATIONS, Sampling(n=2, max_tokens=8, seed=3))
    assert [len(g) for g in out] == [2, 2] and all(t for g in out for t in g)
    assert generator.chat(CONVERSATIONS, Sampling(n=2, max_tokens=8, seed=3)) == out
    generator.close()

    reward = TransformersRewardModel(TransformersModel(path=TINY_REWARD_MODEL), cuda)
    assert reward.model.dtype == torch.bfloat16
    # bf16 logits differ from the CPU fp32 reference only by rounding.
    assert reward.score(SCORED) == pytest.approx(tiny_reward_model.score(SCORED), abs=0.1)
    reward.close()

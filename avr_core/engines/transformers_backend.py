"""The transformers backend: batched chat `generate` and sequence-classification reward scoring.

Runs on CPU or one CUDA GPU. Conversations go through in batches of `execution.batch_size`; when a
batch runs out of memory it is halved and retried (down to one conversation) before the engine
gives up with an `EngineError`, so one long prompt does not fail a whole shard on a busy GPU.

torch and transformers are imported inside the functions that use them, so `avr_core.engines` can
import this module without loading torch for the `rules` or `openai` backends.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from avr_core.config import ExecutionConfig, TransformersModel
from avr_core.engines.base import Completion, EngineError, messages_as_dicts
from avr_core.models import resolve_model_dir
from avr_core.schemas import Constraint, Conversation, Sampling

if TYPE_CHECKING:
    import torch

__all__ = [
    "TransformersGenerator",
    "TransformersRewardModel",
    "cpu_supports_bf16",
    "is_out_of_memory",
    "pick_device",
    "pick_dtype",
    "run_in_batches",
]

log = logging.getLogger(__name__)

Item = TypeVar("Item")
Result = TypeVar("Result")


def pick_device(execution: ExecutionConfig) -> torch.device:
    """The device to run on: CUDA when asked or available (`auto`), else CPU."""
    import torch

    if execution.device == "cuda" and not torch.cuda.is_available():
        raise EngineError("execution.device is 'cuda' but no CUDA device is available")
    if execution.device == "cuda" or (execution.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def cpu_supports_bf16() -> bool:
    """Whether this CPU does bf16 natively (AVX512-BF16, AMX); emulated bf16 is slower than fp32."""
    import torch

    cpu = torch.cpu
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(cpu, name, lambda: False)() for name in checks)


def pick_dtype(
    spec: TransformersModel, device: torch.device, *, for_scoring: bool = False
) -> torch.dtype:
    """Weights dtype: `spec.dtype` if set; else bf16 on CUDA, and on CPUs with native bf16.

    Reward scores on CPU stay in fp32 under `auto`: one forward pass is cheap there, and bf16
    rounding of a scalar logit would turn small score gaps into ties that the selection rules read.
    """
    import torch

    explicit = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if spec.dtype != "auto":
        return explicit[spec.dtype]
    if device.type == "cuda":
        return torch.bfloat16
    if for_scoring:
        return torch.float32
    return torch.bfloat16 if cpu_supports_bf16() else torch.float32


def is_out_of_memory(error: BaseException) -> bool:
    """Whether `error` is an accelerator (or host) out-of-memory failure worth a smaller batch."""
    import torch

    if isinstance(error, torch.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


def _free_cached_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_in_batches(
    items: Sequence[Item],
    batch_size: int,
    run_batch: Callable[[Sequence[Item], int], list[Result]],
    what: str = "batch",
) -> list[Result]:
    """`run_batch(items[i:i+b], i)` over all items in order, halving `b` on out-of-memory errors.

    A batch that runs out of memory is retried at half the size from the same position; the smaller
    size is kept for the rest of the call (the next batches are likely as long). At size 1 the error
    becomes an `EngineError`. `run_batch` gets the batch's start index (for per-batch seeds).
    """
    results: list[Result] = []
    size = max(1, batch_size)
    start = 0
    while start < len(items):
        batch = items[start : start + size]
        oom_message = ""
        try:
            out = run_batch(batch, start)
        except Exception as err:
            if not is_out_of_memory(err):
                raise
            oom_message = str(err) or type(err).__name__
        if oom_message:
            # Freed outside the except block: the live traceback would pin the batch's tensors.
            _free_cached_memory()
            if len(batch) == 1:
                raise EngineError(
                    f"{what}: out of memory on a single conversation (item {start}): {oom_message}"
                )
            size = max(1, len(batch) // 2)
            log.warning(
                "%s: out of memory at item %d; retrying with batch size %d", what, start, size
            )
            continue
        if len(out) != len(batch):
            raise EngineError(f"{what}: got {len(out)} results for a batch of {len(batch)}")
        results.extend(out)
        start += len(batch)
    return results


def _load_tokenizer(model_dir: Path, padding_side: str) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = padding_side
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.chat_template is None:
        raise EngineError(f"the tokenizer in {model_dir} has no chat template")
    return tokenizer


class _LocalEngine:
    """What both transformers engines share: the spec's id, device, dtype, tokenizer and model.

    `model_id` is always the spec's id, never `model_dir`: lineage must name the model asked for,
    not the cache directory it happened to be resolved to.
    """

    _role: ClassVar[str]
    _padding_side: ClassVar[str]
    _for_scoring: ClassVar[bool]

    def __init__(
        self, spec: TransformersModel, execution: ExecutionConfig, model_dir: Path | None = None
    ) -> None:
        self.model_id = spec.model_id
        self.batch_size = execution.batch_size
        # The device is checked before the model is resolved: a bad request fails without loading.
        self.device = pick_device(execution)
        self.model_dir = model_dir if model_dir is not None else resolve_model_dir(spec.path)
        self.tokenizer = _load_tokenizer(self.model_dir, self._padding_side)
        self.dtype = pick_dtype(spec, self.device, for_scoring=self._for_scoring)
        self.model: Any = self._load_model()
        self.model.to(self.device).eval()
        log.info("loaded %s %s on %s as %s", self._role, self.model_id, self.device, self.dtype)

    def _load_model(self) -> Any:
        raise NotImplementedError

    def _require_model(self) -> Any:
        if self.model is None:
            raise EngineError(f"{self.model_id}: {self._role} is closed")
        return self.model

    def close(self) -> None:
        """Drop the model and return its memory (GPU memory too); the engine is unusable after."""
        self.model = None
        _free_cached_memory()


class TransformersGenerator(_LocalEngine):
    """Generator on `AutoModelForCausalLM.generate`: left-padded chat batches, `n` samples each."""

    _role = "generator"
    # Left padding: every prompt then ends where generation starts, so new tokens line up.
    _padding_side = "left"
    _for_scoring = False

    def _load_model(self) -> Any:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=self.dtype)

    def chat(self, conversations: list[Conversation], sampling: Sampling) -> list[list[str]]:
        """`sampling.n` completions per conversation, grouped per conversation, in input order."""
        self._require_model()
        return run_in_batches(
            conversations,
            self.batch_size,
            lambda batch, start: self._generate_batch(batch, sampling, start),
            what=f"{self.model_id} generate",
        )

    def _generate_batch(
        self, batch: Sequence[Conversation], sampling: Sampling, start: int
    ) -> list[list[str]]:
        import torch

        prompts = [
            self.tokenizer.apply_chat_template(
                messages_as_dicts(c), tokenize=False, add_generation_prompt=True
            )
            for c in batch
        ]
        # The chat template already holds the special tokens (BOS/<|im_start|>): add none twice.
        inputs = self.tokenizer(
            prompts, return_tensors="pt", padding=True, add_special_tokens=False
        ).to(self.device)
        greedy = sampling.temperature == 0
        options: dict[str, Any] = {
            "max_new_tokens": sampling.max_tokens,
            "pad_token_id": self.tokenizer.pad_token_id,
        }
        if greedy:
            # Greedy samples are identical: decode once and repeat rather than computing n copies.
            options.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            options.update(
                do_sample=True,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                top_k=None,
                num_return_sequences=sampling.n,
            )
        with torch.random.fork_rng(devices=self._rng_devices()), torch.inference_mode():
            if sampling.seed is not None:
                # Seeded per batch position: the same call with the same batch size is reproducible,
                # and the caller's global RNG state is left untouched (fork_rng restores it).
                torch.manual_seed(sampling.seed + start)
            output = self.model.generate(**inputs, **options)
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        per_prompt = 1 if greedy else sampling.n
        prompt_tokens = inputs["attention_mask"].sum(dim=1).tolist()
        generated = generated_lengths(new_tokens.tolist(), self._stop_token_ids())
        texts: list[str] = [
            Completion(text.strip(), prompt_tokens[row // per_prompt], generated[row])
            for row, text in enumerate(
                self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            )
        ]
        grouped = [texts[i * per_prompt : (i + 1) * per_prompt] for i in range(len(batch))]
        if greedy:
            grouped = [group * sampling.n for group in grouped]
        return grouped

    def _rng_devices(self) -> list[int]:
        return [self.device.index or 0] if self.device.type == "cuda" else []

    def _stop_token_ids(self) -> frozenset[int]:
        """The ids that end a generation (the generation config's EOS, one id or several)."""
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        return frozenset([eos] if isinstance(eos, int) else (eos or []))


def generated_lengths(rows: Sequence[Sequence[int]], stop_ids: frozenset[int]) -> list[int]:
    """Tokens each row of a padded `generate` output really generated: up to and including its
    first stop token (what follows is padding; the pad id may equal EOS), else the whole row."""
    lengths = []
    for row in rows:
        stop = next((i for i, token in enumerate(row) if token in stop_ids), None)
        lengths.append(len(row) if stop is None else stop + 1)
    return lengths


class TransformersRewardModel(_LocalEngine):
    """RewardModel on `AutoModelForSequenceClassification`: one raw logit per conversation."""

    _role = "reward model"
    # Right padding keeps each sequence's positions as in an unpadded forward pass; the head
    # pools the last token that is not `pad_token_id`, which must therefore be set.
    _padding_side = "right"
    _for_scoring = True

    def _load_model(self) -> Any:
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(self.model_dir, dtype=self.dtype)
        if model.config.num_labels != 1:
            raise EngineError(
                f"{self.model_dir} has {model.config.num_labels} labels; a reward model needs 1"
            )
        if model.config.pad_token_id is None:
            model.config.pad_token_id = self.tokenizer.pad_token_id
        return model

    def score(
        self,
        conversations: list[Conversation],
        constraints: list[list[Constraint]] | None = None,
    ) -> list[float]:
        """Raw reward logits (no sigmoid), one per conversation; `constraints` are ignored."""
        self._require_model()
        return run_in_batches(
            conversations, self.batch_size, self._score_batch, what=f"{self.model_id} score"
        )

    def _score_batch(self, batch: Sequence[Conversation], start: int) -> list[float]:
        import torch

        texts = [
            self.tokenizer.apply_chat_template(
                messages_as_dicts(c), tokenize=False, add_generation_prompt=False
            )
            for c in batch
        ]
        inputs = self.tokenizer(
            texts, return_tensors="pt", padding=True, add_special_tokens=False
        ).to(self.device)
        with torch.inference_mode():
            logits = self.model(**inputs).logits
        return [float(x) for x in logits[:, 0].float().cpu()]

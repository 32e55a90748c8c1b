"""Our `TrainingConfig` -> TRL's `SFTConfig` / `DPOConfig` and peft's `LoraConfig`: the one adapter.

`trl`, `peft` and `torch` are imported inside the functions so that this module imports without
them (the task process never needs them; the trainer child does).
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

from avr_core.config import TrainingConfig

if TYPE_CHECKING:
    import peft
    import trl

__all__ = ["check_extra_keys", "to_dpo_config", "to_lora_config", "to_sft_config"]

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


def _bf16_supported(use_cpu: bool) -> bool:
    """bf16 mixed precision only on a CUDA device that has it (TRL's default bf16 fails on CPU)."""
    if use_cpu:
        return False
    import torch

    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())


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


def _trl_config_class(trainer: Literal["sft", "dpo"]) -> type:
    """trl.SFTConfig or trl.DPOConfig (importing trl takes seconds: torch and transformers)."""
    import trl

    config_cls: type = trl.SFTConfig if trainer == "sft" else trl.DPOConfig
    return config_cls


def _refuse_mapped(extra: Mapping[str, Any]) -> None:
    for key in extra:
        if key in _MAPPED_FIELDS:
            raise ValueError(
                f"TrainingConfig.extra key {key!r} is set by the adapter: "
                "use the TrainingConfig field of that name instead"
            )


def _check_extra(extra: Mapping[str, Any], config_cls: type) -> None:
    """Refuse `extra` keys that the adapter sets itself or that TRL's config does not have."""
    _refuse_mapped(extra)
    known = {f.name for f in dataclasses.fields(config_cls) if f.init}
    for key in extra:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=3)
            hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
            raise ValueError(
                f"TrainingConfig.extra key {key!r} is not a field of trl.{config_cls.__name__}{hint}"
            )


def check_extra_keys(extra: Mapping[str, Any], trainer: Literal["sft", "dpo"]) -> None:
    """Pre-flight check of the pass-through keys for `trainer`'s TRL config, naming a bad key.

    Keys the adapter sets are refused without TRL; the others are checked against the fields of
    trl.SFTConfig / trl.DPOConfig, importing trl only when there is something to check.
    """
    _refuse_mapped(extra)
    if extra:
        _check_extra(extra, _trl_config_class(trainer))


def _apply_extra(args: dict[str, Any], extra: dict[str, Any], config_cls: type) -> dict[str, Any]:
    """Overlay `extra` on the mapped arguments, refusing keys TRL's config does not have."""
    _check_extra(extra, config_cls)
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

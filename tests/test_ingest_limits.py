"""Prompt size limits: characters without a tokenizer, tokens with the policy's (tokenizer only)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from avr_core.config import (
    DEFAULT_MAX_PROMPT_CHARS,
    IngestConfig,
    OpenAIModel,
    TransformersModel,
    TreeConfig,
)
from avr_core.fingerprint import ingest_step_config
from avr_core.ingest import (
    TEMPLATE_RESERVE_TOKENS,
    BadRowError,
    load_chat_token_counter,
    model_context_length,
    prompt_token_limit,
    read_prompts,
)
from avr_core.schemas import Sampling
from avr_core.settings import AvrSettings


def _write(path: Path, rows: list[dict[str, object]]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _long_chat(chars: int) -> list[dict[str, str]]:
    """A conversation whose contents add up to `chars` characters over three turns."""
    return [
        {"role": "user", "content": "a" * (chars - 20)},
        {"role": "assistant", "content": "b" * 10},
        {"role": "user", "content": "c" * 10},
    ]


def test_a_prompt_over_the_character_limit_is_a_bad_row(tmp_path: Path) -> None:
    rows = [
        {"prompt": "short"},
        {"prompt": "x" * 101},
        {"messages": _long_chat(101)},
        {"messages": _long_chat(100)},
    ]
    source = _write(tmp_path / "sizes.jsonl", rows)
    with pytest.raises(BadRowError) as err:
        read_prompts(source, max_prompt_chars=100)
    assert (err.value.row, err.value.field) == (1, "prompt")
    assert "101 characters, more than max_prompt_chars=100" in str(err.value)

    result = read_prompts(source, on_bad_row="skip", max_prompt_chars=100)
    assert [len(p.messages) for p in result.prompts] == [1, 3]  # "short" and the 100-char chat
    rejects = [json.loads(x) for x in Path(result.rejects_path or "").read_text().splitlines()]
    assert [(r["row"], r["field"]) for r in rejects] == [(1, "prompt"), (2, "messages")]
    # No limit: everything is kept.
    assert len(read_prompts(source, max_prompt_chars=None).prompts) == 4


def test_the_default_character_limit_is_on() -> None:
    assert IngestConfig().max_prompt_chars == DEFAULT_MAX_PROMPT_CHARS
    assert IngestConfig().max_prompt_tokens is None


def test_the_size_limits_are_in_the_ingest_fingerprint() -> None:
    base = ingest_step_config("sha", IngestConfig())
    assert base["max_prompt_chars"] == DEFAULT_MAX_PROMPT_CHARS and "max_prompt_tokens" in base
    assert ingest_step_config("sha", IngestConfig(max_prompt_chars=10)) != base
    assert ingest_step_config("sha", IngestConfig(max_prompt_tokens=10)) != base


def test_the_token_limit_needs_a_counter(tmp_path: Path) -> None:
    source = _write(tmp_path / "p.jsonl", [{"prompt": "hi"}])
    with pytest.raises(ValueError, match="max_prompt_tokens needs count_tokens"):
        read_prompts(source, max_prompt_tokens=10)


def test_a_prompt_over_the_token_limit_is_a_bad_row(tiny_model_dir: Path, tmp_path: Path) -> None:
    count_tokens = load_chat_token_counter(tiny_model_dir)
    short = [{"role": "user", "content": "Name three rivers."}]
    base = count_tokens(short)
    assert 0 < base < 60  # the chat template's system turn and framing plus a few words
    words = " ".join(["river"] * 50)
    assert count_tokens([{"role": "user", "content": words}]) > base + 40  # counts the content
    rows = [{"prompt": "Name three rivers."}, {"prompt": words}, {"prompt": "last"}]
    source = _write(tmp_path / "tokens.jsonl", rows)

    with pytest.raises(BadRowError, match=r"row 1: field 'prompt': too long: \d+ tokens") as err:
        read_prompts(source, max_prompt_tokens=base + 10, count_tokens=count_tokens)
    assert f"more than the limit of {base + 10}" in str(err.value)
    result = read_prompts(
        source, on_bad_row="skip", max_prompt_tokens=base + 10, count_tokens=count_tokens
    )
    assert [p.messages[0].content for p in result.prompts] == ["Name three rivers.", "last"]
    assert result.rejects == 1


def test_a_chat_template_that_fails_is_a_bad_row(tmp_path: Path) -> None:
    def refuses_system(messages: list[dict[str, str]]) -> int:
        if messages[0]["role"] == "system":
            raise ValueError("System role not supported")
        return 1

    rows = [{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]}]
    source = _write(tmp_path / "system.jsonl", rows)
    with pytest.raises(BadRowError, match="field 'messages': .*System role not supported"):
        read_prompts(source, max_prompt_tokens=10, count_tokens=refuses_system)


def test_the_default_token_limit_leaves_room_for_the_tree(tiny_model_dir: Path) -> None:
    assert model_context_length(tiny_model_dir) == 8192
    assert prompt_token_limit(8192, 128) == 8192 - 3 * 128 - TEMPLATE_RESERVE_TOKENS
    with pytest.raises(ValueError, match="no room for a prompt .* lower tree.sampling.max_tokens"):
        prompt_token_limit(4096, 2048)


def test_the_ingest_task_takes_its_token_limit_from_the_policy(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    from tasks.prompts import _token_limit

    config = AvrSettings(cache_dir=tmp_path)
    policy = TransformersModel(path=str(tiny_model_dir))
    tree = TreeConfig(sampling=Sampling(max_tokens=100))
    limit, count_tokens = _token_limit(IngestConfig(), policy, tree, config)
    assert limit == 8192 - 300 - TEMPLATE_RESERVE_TOKENS and count_tokens is not None
    limit, _ = _token_limit(IngestConfig(max_prompt_tokens=50), policy, tree, config)
    assert limit == 50
    # Without a policy (the ingest-prompts flow) there is no token limit, unless one is asked for.
    assert _token_limit(IngestConfig(), None, None, config) == (None, None)
    with pytest.raises(ValueError, match="max_prompt_tokens needs the policy's tokenizer"):
        _token_limit(IngestConfig(max_prompt_tokens=50), None, None, config)
    served = OpenAIModel(path="m", base_url="http://localhost:8000/v1")
    with pytest.raises(ValueError, match="openai:m has none"):
        _token_limit(IngestConfig(max_prompt_tokens=50), served, None, config)

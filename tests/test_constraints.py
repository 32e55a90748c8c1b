"""Verifiable constraints, the rules reward model and the bundled demo prompt set."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from avr_core.config import RulesModel
from avr_core.constraints import (
    CONSTRAINT_CHECKERS,
    CONSTRAINT_TYPES,
    check_constraint,
    count_words,
    score_constraints,
    validate_constraint,
    validate_constraints,
)
from avr_core.engines import UnsupportedBackendError, load_generator, load_reward_model
from avr_core.engines.rules import RulesRewardModel
from avr_core.schemas import Constraint, Message

DEMO_PROMPTS = Path(__file__).parent.parent / "avr_core" / "data" / "demo_prompts.jsonl"


def c(type_: str, **args) -> Constraint:
    return Constraint(type=type_, args=args)


# One (constraint, satisfying response, violating response) per case; every type appears.
CASES = [
    (c("word_count", min=3, max=5), "one two three four", "one two"),
    (c("word_count", max=3), "don't stop well-known", "a b c d"),
    (c("sentence_count", min=2, max=2), "It rains. We stay in!", "It rains. We stay. Bye?"),
    (c("paragraph_count", min=2), "First block.\n\nSecond block.", "One line.\nAnother line."),
    (c("paragraph_count", max=1), "Only one.\nStill one.", "One.\n  \nTwo."),
    (c("char_count", min=3, max=5), "  abcd  ", "abcdef"),
    (
        c("include_keywords", keywords=["Lava", "hot spring"]),
        "LAVA near a hot spring.",
        "lavas only",
    ),
    (c("forbidden_keywords", keywords=["sorry"]), "Sorrys are not words.", "I am SORRY."),
    (c("all_lowercase"), "quiet rain, 3 drops", "Quiet rain"),
    (c("all_uppercase"), "GO TEAM, 2024!", "GO team"),
    (c("bullet_count", min=3, max=3), "- a\n* b\n  • c\n**bold**", "- a\n- b\n---"),
    (c("starts_with", phrase="Photosynthesis"), "  photosynthesis is...", "So, photosynthesis"),
    (c("ends_with", phrase="Thanks!"), "See you Monday. thanks!\n", "Thanks! See you."),
    (c("json_parsable"), '```json\n{"city": "Paris"}\n```', "city: Paris"),
    (c("json_parsable"), " [1, 2] ", "{'a': 1}"),
    (c("no_commas"), "No commas here.", "Yes, one."),
    (
        c("keyword_frequency", keyword="weekend", min=2),
        "Weekend plans: a weekend.",
        "weekends, weekend",
    ),
    (c("keyword_frequency", keyword="bread", max=1), "bread and breadsticks", "Bread, bread"),
    # IFEval instructions, checked by lm-eval's maintained checkers (avr_core.ifeval)
    (
        c("ifeval", id="keywords:existence", kwargs={"keywords": ["autumn"]}),
        "Autumn leaves fall.",
        "Spring flowers bloom.",
    ),
    (
        c(
            "ifeval",
            id="length_constraints:number_sentences",
            kwargs={"relation": "less than", "num_sentences": 2},
        ),
        "One sentence only.",
        "One. Two. Three.",
    ),
]


def test_ifeval_constraints_are_validated_by_name():
    with pytest.raises(ValueError, match="must be an IFEval instruction id.*'made:up'"):
        validate_constraint(c("ifeval", id="made:up"))
    with pytest.raises(ValueError, match="argument 'kwargs' must be an object"):
        validate_constraint(c("ifeval", id="keywords:existence", kwargs=["autumn"]))


def test_every_constraint_type_is_covered() -> None:
    assert {case[0].type for case in CASES} == set(CONSTRAINT_TYPES) == set(CONSTRAINT_CHECKERS)


@pytest.mark.parametrize(("constraint", "good", "bad"), CASES, ids=lambda x: getattr(x, "type", ""))
def test_constraint_satisfied_and_violated(constraint: Constraint, good: str, bad: str) -> None:
    assert check_constraint(constraint, good) is True
    assert check_constraint(constraint, bad) is False


def test_count_words_ignores_punctuation_and_bullets() -> None:
    assert count_words("- first item\n- it's well-known, right?") == 5
    assert count_words("") == 0


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"type": "word_cnt", "args": {"max": 3}}, "unknown constraint type 'word_cnt'"),
        ({"type": "word_count", "args": {}}, "word_count): give at least one of"),
        ({"type": "word_count", "args": {"max": -1}}, "word_count): argument 'max'"),
        ({"type": "word_count", "args": {"max": True}}, "argument 'max' must be a non-negative"),
        (
            {"type": "word_count", "args": {"min": 5, "max": 2}},
            "'min' (5) is greater than 'max' (2)",
        ),
        ({"type": "word_count", "args": {"maximum": 3}}, "unknown argument 'maximum'"),
        ({"type": "include_keywords", "args": {}}, "missing required argument 'keywords'"),
        ({"type": "include_keywords", "args": {"keywords": "lava"}}, "argument 'keywords'"),
        ({"type": "include_keywords", "args": {"keywords": ["ok", " "]}}, "argument 'keywords'"),
        ({"type": "ends_with", "args": {"phrase": ""}}, "ends_with): argument 'phrase'"),
        ({"type": "all_lowercase", "args": {"strict": True}}, "expected no arguments"),
        ({"type": "keyword_frequency", "args": {"keyword": "x"}}, "give at least one of"),
        ({"args": {}}, "expected {'type': str"),
        ({"type": "no_commas", "args": [1]}, "'args' must be an object"),
    ],
)
def test_bad_constraints_name_type_and_argument(raw: dict, message: str) -> None:
    with pytest.raises(ValueError) as err:
        validate_constraints([{"type": "no_commas", "args": {}}, raw])
    assert message in str(err.value)
    assert "constraints[1]" in str(err.value)  # the position of the bad constraint


def test_validate_constraints_returns_constraint_records() -> None:
    out = validate_constraints([{"type": "word_count", "args": {"max": 5}}, c("no_commas")])
    assert out == [c("word_count", max=5), c("no_commas")]
    with pytest.raises(ValueError, match="expected a list"):
        validate_constraints({"type": "no_commas"})  # type: ignore[arg-type]


def test_score_constraints_is_fraction_satisfied() -> None:
    rules = [c("no_commas"), c("all_lowercase"), c("word_count", max=2), c("ends_with", phrase="x")]
    assert score_constraints("hello there", rules) == 0.75
    assert score_constraints("Hello, there friend", rules) == 0.0
    assert score_constraints("anything at all", []) == 1.0


def _chat(answer: str) -> list[Message]:
    return [
        Message(role="user", content="Say something."),
        Message(role="assistant", content=answer),
    ]


def test_rules_reward_model_scores_last_assistant_turn_with_length_penalty() -> None:
    model = load_reward_model(RulesModel(length_penalty=10.0))
    assert model.model_id == "rules:constraints"
    rules = [c("all_lowercase"), c("word_count", max=3)]
    refined = _chat("First Answer Too Long Here") + [
        Message(role="user", content="Refine it."),
        Message(role="assistant", content="short answer"),
    ]
    scores = model.score([_chat("Loud Answer"), refined, _chat("")], [rules, rules, []])
    assert scores == pytest.approx([0.5 - 0.02, 1.0 - 0.02, 1.0])
    model.close()


def test_rules_reward_model_rejects_missing_or_bad_input() -> None:
    model = RulesRewardModel(RulesModel())
    with pytest.raises(ValueError, match="needs constraints"):
        model.score([_chat("hi")])
    with pytest.raises(ValueError, match="1 conversations but 2 constraint lists"):
        model.score([_chat("hi")], [[], []])
    with pytest.raises(ValueError, match="conversation 0 has no assistant message"):
        model.score([[Message(role="user", content="hi")]], [[]])
    with pytest.raises(ValueError, match=r"conversation 0 constraints\[0\]: unknown constraint"):
        model.score([_chat("hi")], [[c("shouting")]])


def test_rules_backend_cannot_generate() -> None:
    with pytest.raises(UnsupportedBackendError, match="'rules' only scores"):
        load_generator(RulesModel())


def test_demo_prompts_are_valid_and_varied() -> None:
    lines = DEMO_PROMPTS.read_text().splitlines()
    assert len(lines) == 24
    prompts = set()
    for row, line in enumerate(lines):
        item = json.loads(line)
        assert set(item) == {"prompt", "constraints"}, f"row {row}"
        assert item["prompt"].strip(), f"row {row}"
        assert 1 <= len(item["constraints"]) <= 4, f"row {row}"
        validate_constraints(item["constraints"], f"demo_prompts.jsonl row {row} constraints")
        for constraint in item["constraints"]:  # demo answers use ~128-192 new tokens
            assert constraint["args"].get("max", 0) <= 120, f"row {row}"
        prompts.add(item["prompt"])
    assert len(prompts) == 24


def test_ifeval_rows_become_constraints_the_rules_reward_scores(tmp_path):
    import json as json_module

    from avr_core.ingest import BadRowError, read_prompts

    row = {
        "prompt": "Write about autumn in fewer than 2 sentences.",
        "instruction_id_list": ["keywords:existence", "length_constraints:number_sentences"],
        # IFEval rows list unused kwargs as null
        "kwargs": [
            {"keywords": ["autumn"], "num_sentences": None, "relation": None},
            {"keywords": None, "num_sentences": 2, "relation": "less than"},
        ],
    }
    source = tmp_path / "ifeval.jsonl"
    source.write_text(json_module.dumps(row) + "\n")
    (prompt,) = read_prompts(str(source)).prompts
    assert [x.args["id"] for x in prompt.constraints] == row["instruction_id_list"]
    assert prompt.constraints[0].args["kwargs"] == {"keywords": ["autumn"]}
    reward = RulesRewardModel(RulesModel())
    conversation = [Message(role="user", content=row["prompt"])]
    scores = reward.score(
        [
            [*conversation, Message(role="assistant", content="Autumn is golden.")],
            [*conversation, Message(role="assistant", content="Leaves fall. Days cool. Wind.")],
        ],
        [prompt.constraints, prompt.constraints],
    )
    assert scores[0] > scores[1]
    bad = {**row, "instruction_id_list": ["keywords:existence", "made:up"]}
    source.write_text(json_module.dumps(bad) + "\n")
    with pytest.raises(BadRowError, match=r"row 0.*instruction_id_list\[1\].*made:up"):
        read_prompts(str(source))

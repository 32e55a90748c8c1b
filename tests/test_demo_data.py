"""The bundled prompt sets: a train and a held-out split whose constraints tie answers to the topic.

Regression (issue 9): with format-only constraints the rules reward preferred an off-topic answer
("The answer to ... is the Bible.") over an on-topic haiku. Every bundled prompt now requires
topic words that the prompt itself names, so an off-topic answer always loses.
"""

from __future__ import annotations

from functools import cache
from typing import Literal

import pytest

from avr_core.config import RulesModel
from avr_core.constraints import check_constraint, count_keyword
from avr_core.engines.rules import RulesRewardModel
from avr_core.ingest import bundled_prompts_path, read_prompts, resolve_prompt_source
from avr_core.schemas import Constraint, Message, PromptRecord

OFF_TOPIC = "The answer to your question is the Bible."
EXPECTED_SIZES = {"train": 24, "heldout": 12}

# One hand-written answer per bundled prompt (by position) that meets all its constraints: proof
# that each constraint set can be satisfied at once, and the on-topic side of the regression.
TRAIN_ANSWERS: dict[int, str] = {
    0: "Sunlight contains all colors of light. When it enters the atmosphere, tiny gas molecules "
    "scatter the short blue wavelengths far more than the longer red ones. That scattered blue "
    "light reaches our eyes from every direction, so the whole sky looks blue during the day.",
    1: "Hi Sam,\n\nCould we move our Friday meeting to Monday at the same time? Something urgent "
    "came up on Friday. Let me know if Monday works for you.\n\nThanks!",
    2: "- Take shorter showers\n- Turn off the tap while brushing\n- Fix leaking pipes quickly\n"
    "- Reuse water from rinsing vegetables",
    3: "the ocean sleeps beneath the moon\nsilver waves hum a quiet tune\nstars drift down to "
    "touch the foam",
    4: "A volcano is a mountain with an opening deep into the hot inside of the Earth. Sometimes "
    "melted rock called lava bursts out of the top. When it cools, it turns into new rock.",
    5: "Regular exercise strengthens the heart and lungs. It builds muscle and keeps bones "
    "healthy. Exercise also improves mood and sleep and it lowers the risk of many diseases.",
    6: "- Go to sleep at the same time every night\n- Keep your bedroom dark and cool\n"
    "- Put screens away an hour before bed",
    7: "Photosynthesis is how plants use light energy to turn water and carbon dioxide into "
    "sugar. Oxygen is released as a by-product.",
    8: "Dear Ana, thank you so much for watering my plants while I was away. They look healthy "
    "and happy, and it was a real relief to know they were in good hands. Best wishes.",
    9: "- mercury\n- venus\n- earth\n- mars\n- jupiter",
    10: "A rainbow forms when sunlight shines through raindrops. Each drop bends the light and "
    "splits it into its colors.\n\nThe light reflects off the back of the drop and bends again "
    "as it leaves, so we see a curved band from red to violet.",
    11: "My ideal weekend starts with a slow breakfast and a long walk. In the afternoon I read "
    "in the park. A weekend like that leaves me rested for Monday.",
    12: "This reusable steel bottle keeps drinks cold for a full day. Its sealed lid will not "
    "leak in your bag, and it is easy to clean. Carry it everywhere and skip plastic for good.",
    13: '{"city": "Paris", "country": "France"}',
    14: "CONGRATULATIONS ON YOUR NEW JOB! BE CURIOUS, ASK QUESTIONS AND TRUST YOURSELF. YOU WERE "
    "CHOSEN FOR A REASON.",
    15: "Weather is the state of the air on a given day: rain, sun, wind and temperature. Climate "
    "is the average pattern of weather in a place over many years, usually thirty or more. "
    "Weather changes by the hour, while climate changes slowly.",
    16: "Hi Maya,\n\nThank you for inviting me to your birthday party on Saturday. I already have "
    "family plans that day, so I can't make it. I hope you have a wonderful party!\n\nBest,\nLeo",
    17: "red leaves drift down\ndancing on the cold wind\nthe quiet trees let go",
    18: "- Free books to borrow\n- Quiet spaces to study\n- Internet access and computers\n"
    "- Story time for children",
    19: "Water makes up most of the body and is lost every day through sweat and breathing. "
    "Drinking water replaces it so that our organs, muscles and brain keep working well.",
    20: "I would call it Golden Crust. The name suggests warm bread fresh from the oven and a "
    "friendly place where neighbors stop every morning.",
    21: "A computer's memory holds the data and instructions that programs are using right now. "
    "The processor can read and write it very quickly, which keeps apps running smoothly. When "
    "the power goes off, this working memory is cleared.",
    22: "- A second language opens doors to new jobs\n- It lets you connect with people from "
    "other cultures\nGood luck!",
    23: "The tea glows amber in a white cup. Its smell is sweet and earthy, with a hint of lemon. "
    "The warm porcelain heats my hands, and the first sip tastes gently bitter. Steam curls "
    "upward and the spoon clinks softly against the rim.",
}
HELDOUT_ANSWERS: dict[int, str] = {
    0: "Bicycle gears change how far the wheel turns each time you push a pedal. In a low gear, "
    "one pedal stroke turns the wheel only a little, so each push needs less force. That makes "
    "climbing a hill easier, though you pedal faster.",
    1: "Hey Jo, don't forget to bring the tent for our camping trip. I'll pack the food and the "
    "stove. See you Saturday!",
    2: "- Start reviewing a week before the exam\n- Test yourself with practice questions\n"
    "- Get a full night of rest before the big day",
    3: "the playful cat chases string all day\nthen naps in the sun the cozy way",
    4: "Bring a large pot of water to a rolling boil. Add a generous pinch of salt. Stir in the "
    "pasta and cook it until it is tender but still firm. Drain it and serve with your "
    "favorite sauce.",
    5: "I recommend Ticket to Ride for a family evening. The game is easy to learn in ten "
    "minutes, and children and adults compete on equal terms as they build train routes across "
    "the map. Each game lasts about an hour, so it fits nicely after dinner.",
    6: "Dear Mr. Patel,\n\nThe heater in my apartment stopped working yesterday and the rooms are "
    "getting very cold. Could you please send someone to repair it this week?\n\nThank you,\n"
    "Anna Lee",
    7: "A refrigerator pumps a special fluid called a refrigerant through coils. Inside the "
    "fridge the fluid evaporates and absorbs heat from the food. A compressor then pushes the "
    "warm fluid to coils at the back where the heat escapes into the room. This keeps the food "
    "cold.",
    8: '{"title": "Pride and Prejudice", "author": "Jane Austen"}',
    9: "RECYCLE TODAY FOR A CLEANER NEIGHBORHOOD TOMORROW!",
    10: "- Dogs are loyal companions who love their families\n- They keep you active with daily "
    "walks",
    11: "A password manager stores all your logins in one encrypted vault, so you only need to "
    "remember a single master password. It can create long random passwords for every site and "
    "fill them in for you. Stay safe online.",
}
COMPLIANT_ANSWERS = {"train": TRAIN_ANSWERS, "heldout": HELDOUT_ANSWERS}


@cache
def _bundled(split: str) -> list[PromptRecord]:
    return read_prompts(resolve_prompt_source(f"bundled:{split}")).prompts


def _prompt_text(record: PromptRecord) -> str:
    return record.messages[-1].content


def _topic_keywords(constraint: Constraint) -> list[str] | None:
    """The words a constraint requires (so an off-topic answer misses them), else None."""
    if constraint.type == "include_keywords":
        return list(constraint.args["keywords"])
    if constraint.type == "keyword_frequency" and constraint.args.get("min", 0) >= 1:
        return [constraint.args["keyword"]]
    return None


def _topic_constraints(record: PromptRecord) -> list[Constraint]:
    return [c for c in record.constraints if _topic_keywords(c) is not None]


# Every bundled prompt as (split, position), so a failure names the prompt.
ALL_PROMPTS = [(split, i) for split, size in EXPECTED_SIZES.items() for i in range(size)]


def _record(split: str, index: int) -> PromptRecord:
    return _bundled(split)[index]


@pytest.mark.parametrize(("split", "size"), EXPECTED_SIZES.items())
def test_bundled_sets_read_cleanly(split: Literal["train", "heldout"], size: int) -> None:
    result = read_prompts(bundled_prompts_path(split))
    assert len(result.prompts) == size
    assert result.rejects == 0 and result.duplicates == 0
    assert sorted(COMPLIANT_ANSWERS[split]) == list(range(size))


def test_heldout_split_shares_no_prompt_with_train() -> None:
    train, heldout = _bundled("train"), _bundled("heldout")
    assert not {r.prompt_id for r in train} & {r.prompt_id for r in heldout}
    train_texts = {_prompt_text(r).casefold() for r in train}
    assert not train_texts & {_prompt_text(r).casefold() for r in heldout}


@pytest.mark.parametrize(("split", "index"), ALL_PROMPTS)
def test_every_prompt_names_the_topic_words_it_checks(split: str, index: int) -> None:
    record = _record(split, index)
    text = _prompt_text(record)
    visible = [
        c
        for c in _topic_constraints(record)
        if all(count_keyword(text, word) > 0 for word in _topic_keywords(c) or [])
    ]
    assert visible, f"{split}[{index}] has no topic keyword stated in its text: {text!r}"


@pytest.mark.parametrize(("split", "index"), ALL_PROMPTS)
def test_compliant_answer_satisfies_every_constraint(split: str, index: int) -> None:
    record = _record(split, index)
    answer = COMPLIANT_ANSWERS[split][index]
    failed = [c for c in record.constraints if not check_constraint(c, answer)]
    assert not failed, f"{split}[{index}] answer fails {failed}"


@pytest.mark.parametrize(("split", "index"), ALL_PROMPTS)
def test_off_topic_answer_misses_a_topic_constraint(split: str, index: int) -> None:
    topic = _topic_constraints(_record(split, index))
    assert any(not check_constraint(c, OFF_TOPIC) for c in topic)


@pytest.mark.parametrize(("split", "index"), ALL_PROMPTS)
def test_rules_reward_prefers_on_topic_answer(split: str, index: int) -> None:
    record = _record(split, index)
    conversations = [
        [*record.messages, Message(role="assistant", content=answer)]
        for answer in (COMPLIANT_ANSWERS[split][index], OFF_TOPIC)
    ]
    on_topic, off_topic = RulesRewardModel(RulesModel()).score(
        conversations, [record.constraints, record.constraints]
    )
    assert off_topic < on_topic


def test_resolve_prompt_source_names_bundled_sets() -> None:
    train, heldout = bundled_prompts_path("train"), bundled_prompts_path("heldout")
    assert resolve_prompt_source(None) == train
    assert resolve_prompt_source("bundled:train") == train
    assert resolve_prompt_source("bundled:heldout") == heldout
    assert train != heldout
    for other in ("s3://bucket/prompts.jsonl", "data/prompts.parquet", "bundled_prompts.jsonl"):
        assert resolve_prompt_source(other) == other
    with pytest.raises(ValueError, match="bundled:train, bundled:heldout") as raised:
        resolve_prompt_source("bundled:test")
    assert "'bundled:test'" in str(raised.value)


def test_format_compliant_off_topic_haiku_loses_to_the_on_topic_one() -> None:
    """The reported case: an answer that meets every format rule of the autumn-leaves prompt (all
    lowercase, no commas, short) but ignores its topic used to score a perfect 1.0."""
    (index,) = [i for i, r in enumerate(_bundled("train")) if "autumn leaves" in _prompt_text(r)]
    record = _record("train", index)
    off_topic = "the answer to your question is the bible"
    assert all(
        check_constraint(c, off_topic)
        for c in record.constraints
        if c not in _topic_constraints(record)
    )
    conversations = [
        [*record.messages, Message(role="assistant", content=answer)]
        for answer in (TRAIN_ANSWERS[index], off_topic)
    ]
    on_topic_score, off_topic_score = RulesRewardModel(RulesModel()).score(
        conversations, [record.constraints, record.constraints]
    )
    assert off_topic_score < on_topic_score

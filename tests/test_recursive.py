"""Stage II synthesis on scripted engines: greedy search batching, stopping rules, long responses."""

from __future__ import annotations

import math

import pytest

from avr_core.config import LongResponseConfig, SearchConfig, SelectionConfig
from avr_core.recursive import (
    greedy_search,
    sample_long_responses,
    score_long_responses,
    search_gain,
)
from avr_core.schemas import (
    Constraint,
    Conversation,
    GreedySearch,
    Lineage,
    Message,
    PromptRecord,
    Sampling,
)
from avr_core.selection import assemble_trajectory
from avr_core.templates import FINAL_ANSWER_MARKER, extract_final_answer, load_templates
from tests.fakes import LengthReward, conversation_level

TEMPLATES = load_templates()
SEARCH = SearchConfig(x=2, y=2, max_rounds=5, sampling=Sampling(max_tokens=16, seed=3))


def _prompt(text: str, reference: str | None = None) -> PromptRecord:
    return PromptRecord(
        prompt_id=text.replace(" ", "-"),
        messages=[Message(role="user", content=text)],
        reference=reference,
    )


class GrowingGenerator:
    """Answers "a"; a refinement adds one "+" to the answer it refines while the prompt's last
    word (how many rounds it may improve) allows, else repeats it (a tie: the search stops).

    Records, per call, the synthesis level and how many conversations it got.
    """

    model_id = "fake:growing"

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, Sampling]] = []

    def chat(self, conversations: list[Conversation], sampling: Sampling) -> list[list[str]]:
        levels = {conversation_level(c, TEMPLATES) for c in conversations}
        assert len(levels) == 1, f"one level per call, got {levels}"
        level = levels.pop()
        self.calls.append((level, len(conversations), sampling))
        outputs = []
        for conversation in conversations:
            improvable = int(conversation[0].content.split()[-1])
            if level == "answer":
                outputs.append(["a"] * sampling.n)
            elif level == "critique":
                outputs.append([f"critique {k}" for k in range(sampling.n)])
            else:
                answer = conversation[-4].content
                grown = answer + "+" if answer.count("+") < improvable else answer
                outputs.append([grown] * sampling.n)
        return outputs

    def close(self) -> None:
        pass


def test_search_batches_one_call_per_level_per_round_and_prompts_leave_when_they_stop():
    prompts = [_prompt(f"question {n}") for n in (0, 1, 2, 5)]
    generator, reward = GrowingGenerator(), LengthReward()

    searches, stats = greedy_search(generator, reward, prompts, TEMPLATES, SEARCH, Lineage())

    assert [len(s.rounds) for s in searches] == [1, 2, 3, 5]
    assert stats.active_per_round == [4, 3, 2, 1, 1]
    # answer call, then per round one critique call over every active prompt and one refine
    # call over all their x = 2 critiques
    assert [(level, n) for level, n, _ in generator.calls] == [("answer", 4)] + [
        pair
        for active in (4, 3, 2, 1, 1)
        for pair in (("critique", active), ("refine", 2 * active))
    ]
    assert stats.calls_per_round == [2, 2, 2, 2, 2]
    assert len(reward.calls) == stats.reward_calls == 1 + 5
    assert stats.improved_rounds == 0 + 1 + 2 + 5
    assert stats.stopped_no_gain == 3 and stats.reached_max_rounds == 1
    assert stats.rounds == {1: 1, 2: 1, 3: 1, 5: 1}
    # each round samples from its own seed, derived from the configured one
    seeds = {sampling.seed for _, _, sampling in generator.calls}
    assert len(seeds) == len(generator.calls)


def test_search_records_every_round_and_a_tie_stops_the_search():
    searches, _ = greedy_search(
        GrowingGenerator(), LengthReward(), [_prompt("question 2")], TEMPLATES, SEARCH, Lineage()
    )
    (search,) = searches
    assert search.messages[-1].content == "a" and search.initial_score == 1.0
    first, second, last = search.rounds
    assert (first.answer, first.best, first.best_score) == ("a", (0, 0), 2.0)
    assert (second.answer, second.best, second.best_score) == ("a+", (0, 0), 3.0)
    # the best refinement only equals the current answer's score: no winner, the search stops
    assert (last.answer, last.best, last.best_score) == ("a++", None, 3.0)
    assert all(len(c.refinements) == 2 for r in search.rounds for c in r.critiques)
    assert search_gain(search) == 2.0
    assert search.lineage.generator == "fake:growing"
    assert search.lineage.reward_model == "fake:length"


class NaNForPlus(LengthReward):
    """A reward call that fails (NaN) on every refinement."""

    def score(
        self, conversations: list[Conversation], constraints: list[list[Constraint]] | None = None
    ) -> list[float]:
        scores = super().score(conversations, constraints)
        return [
            math.nan if "+" in c[-1].content else s
            for c, s in zip(conversations, scores, strict=True)
        ]


def test_unscored_refinements_count_as_failed():
    searches, stats = greedy_search(
        GrowingGenerator(), NaNForPlus(), [_prompt("question 3")], TEMPLATES, SEARCH, Lineage()
    )
    (search,) = searches
    assert len(search.rounds) == 1 and search.rounds[0].best is None
    assert search.rounds[0].best_score is None
    assert stats.stopped_no_gain == 1 and stats.round_gains == {}


def test_unscored_start_gets_no_rounds():
    class NaNReward(LengthReward):
        def score(self, conversations, constraints=None):
            return [math.nan for _ in conversations]

    searches, stats = greedy_search(
        GrowingGenerator(), NaNReward(), [_prompt("question 3")], TEMPLATES, SEARCH, Lineage()
    )
    assert searches[0].rounds == [] and searches[0].initial_score is None
    assert stats.unscored_starts == 1
    assert search_gain(searches[0]) is None


def test_search_can_start_from_the_reference_answer():
    generator = GrowingGenerator()
    search = SEARCH.model_copy(update={"start": "reference", "max_rounds": 1})
    searches, _ = greedy_search(
        generator,
        LengthReward(),
        [_prompt("question 1", reference="ref")],
        TEMPLATES,
        search,
        Lineage(),
    )
    assert searches[0].messages[-1].content == "ref"
    assert "answer" not in [level for level, _, _ in generator.calls]
    with pytest.raises(ValueError, match="no reference answer .*question-9"):
        greedy_search(
            generator, LengthReward(), [_prompt("question 9")], TEMPLATES, search, Lineage()
        )


def test_a_searched_prompt_becomes_a_trajectory_ending_in_its_final_answer():
    searches, _ = greedy_search(
        GrowingGenerator(), LengthReward(), [_prompt("question 2")], TEMPLATES, SEARCH, Lineage()
    )
    example = assemble_trajectory(searches[0], TEMPLATES, SelectionConfig())
    assert example is not None and example.kind == "trajectory"
    assert [m.role for m in example.messages] == ["user", "assistant"]
    assert extract_final_answer(example.messages[-1].content) == "a++"


# ---- long responses -------------------------------------------------------------------------------


class FlakyThinker:
    """Long responses; the i-th response served for a prompt lacks the final answer when i is in
    `unparsed`; a parsed one's final answer is i + 1 "x"s."""

    model_id = "fake:thinker"

    def __init__(self, unparsed: set[int]) -> None:
        self.unparsed = unparsed
        self.calls: list[tuple[int, Sampling]] = []
        self.served: dict[str, int] = {}

    def chat(self, conversations: list[Conversation], sampling: Sampling) -> list[list[str]]:
        self.calls.append((len(conversations), sampling))
        outputs = []
        for conversation in conversations:
            assert conversation[-1].role == "user", "long responses see only the prompt turns"
            question = conversation[-1].content
            samples = []
            for _ in range(sampling.n):
                seen = self.served.get(question, 0)
                self.served[question] = seen + 1
                if seen in self.unparsed:
                    samples.append(f"thinking about {question} without end")
                else:
                    final = "x" * (seen + 1)
                    samples.append(f"draft... review... {FINAL_ANSWER_MARKER}\n{final}")
            outputs.append(samples)
        return outputs

    def close(self) -> None:
        pass


def _searches(*questions: str) -> list[GreedySearch]:
    return [
        GreedySearch(
            prompt_id=q,
            messages=[Message(role="user", content=q), Message(role="assistant", content="a")],
            initial_score=1.5,
        )
        for q in questions
    ]


def test_unparsed_responses_are_resampled_counted_and_kept_when_still_unparsed():
    # per prompt: the first response and both of its re-samples (served 3rd and 4th) fail
    thinker = FlakyThinker(unparsed={0, 3, 4})
    long = LongResponseConfig(k=3, max_format_retries=2)

    samples, stats = sample_long_responses(thinker, _searches("p", "q"), long, Lineage())

    # one call for all k samples of every prompt, then one per retry round over the gaps
    assert [n for n, _ in thinker.calls] == [2, 2, 2]
    assert thinker.calls[0][1].n == 3 and thinker.calls[1][1].n == 1
    assert thinker.calls[1][1].seed != thinker.calls[2][1].seed
    assert stats.format_retries == 4 and stats.unparsed == 2 and stats.responses == 6
    for sample in samples:
        assert sample.reference_score == 1.5
        assert [m.role for m in sample.prompt] == ["user"]
        assert [r.format_retries for r in sample.samples] == [2, 0, 0]
        assert [r.final_answer for r in sample.samples] == [None, "xx", "xxx"]
        assert all(r.score is None for r in sample.samples)


def test_scoring_reads_only_the_final_answer_in_the_prompt_context():
    samples, _ = sample_long_responses(
        FlakyThinker(unparsed={0}),
        _searches("p"),
        LongResponseConfig(k=2, max_format_retries=0),
        Lineage(),
    )
    reward = LengthReward()
    scored, stats = score_long_responses(reward, samples)
    ((conversations, _),) = reward.calls
    assert [c[-1].content for c in conversations] == ["xx"]
    assert [m.role for m in conversations[0]] == ["user", "assistant"]
    assert [r.score for r in scored[0].samples] == [None, 2.0]
    assert stats.scored == 1 and stats.unparsed == 1
    assert scored[0].lineage.reward_model == "fake:length"

"""Template loading, versioning, message building and the rating / final-answer parsers."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from avr_core.schemas import Message
from avr_core.templates import (
    BUNDLED_TEMPLATE_DIR,
    FINAL_ANSWER_MARKER,
    REQUIRED_TEMPLATES,
    TemplateNotFoundError,
    build_critique_messages,
    build_refine_messages,
    extract_final_answer,
    extract_rating,
    judge_request,
    load_templates,
    refine_request,
)

CONVERSATION = [
    Message(role="user", content="Name a prime number."),
    Message(role="assistant", content="9"),
]


@pytest.fixture
def user_dir(tmp_path: Path) -> Path:
    """A writable copy of the bundled templates."""
    target = tmp_path / "my_templates"
    shutil.copytree(BUNDLED_TEMPLATE_DIR, target)
    return target


def test_bundled_templates_load_with_a_short_hex_version():
    templates = load_templates()
    assert templates.directory == BUNDLED_TEMPLATE_DIR
    assert len(templates.version) == 12
    int(templates.version, 16)
    for name in REQUIRED_TEMPLATES:
        assert (BUNDLED_TEMPLATE_DIR / f"{name}.jinja").is_file()


def test_version_depends_on_contents_not_location(user_dir: Path):
    bundled = load_templates()
    copy = load_templates(user_dir)
    assert copy.directory == user_dir.resolve()
    assert copy.version == bundled.version

    refine = user_dir / "refine.jinja"
    refine.write_text(refine.read_text() + "Be brief.\n")
    assert load_templates(user_dir).version != bundled.version


def test_version_covers_extra_templates(user_dir: Path):
    before = load_templates(user_dir).version
    (user_dir / "extra.jinja").write_text("hello {{ name }}")
    changed = load_templates(user_dir)
    assert changed.version != before
    assert changed.render("extra", name="you") == "hello you"


def test_user_directory_replaces_wording(user_dir: Path):
    (user_dir / "judge.jinja").write_text("Grade it. End with [[N]].\n")
    templates = load_templates(str(user_dir))
    assert judge_request(templates) == Message(role="user", content="Grade it. End with [[N]].")


def test_missing_required_template_names_file_and_directory(user_dir: Path):
    (user_dir / "refine.jinja").unlink()
    with pytest.raises(TemplateNotFoundError) as err:
        load_templates(user_dir)
    assert "refine.jinja" in str(err.value)
    assert str(user_dir.resolve()) in str(err.value)


def test_rendering_an_unknown_template_names_file_and_directory():
    templates = load_templates()
    with pytest.raises(TemplateNotFoundError) as err:
        templates.render("summary")
    assert "summary.jinja" in str(err.value)
    assert str(BUNDLED_TEMPLATE_DIR) in str(err.value)


def test_missing_directory_is_named(tmp_path: Path):
    with pytest.raises(TemplateNotFoundError, match="nowhere"):
        load_templates(tmp_path / "nowhere")


def test_syntax_error_names_the_file(user_dir: Path):
    (user_dir / "judge.jinja").write_text("Review {% if %}\n")
    with pytest.raises(ValueError, match=r"judge\.jinja"):
        load_templates(user_dir)


def test_missing_variable_fails_instead_of_rendering_empty():
    with pytest.raises(ValueError, match=r"trajectory\.jinja.*initial_answer"):
        load_templates().render("trajectory")


def test_judge_and_refine_requests_are_user_turns():
    templates = load_templates()
    judge = judge_request(templates)
    refine = refine_request(templates)
    assert judge.role == refine.role == "user"
    assert "[[" in judge.content and "10" in judge.content
    assert judge.content != refine.content
    assert judge.content == judge.content.strip()


def test_build_critique_messages_appends_the_judge_request():
    templates = load_templates()
    messages = build_critique_messages(CONVERSATION, templates)
    assert messages == [*CONVERSATION, judge_request(templates)]


def test_build_refine_messages_shows_the_critique_then_asks_to_refine():
    templates = load_templates()
    messages = build_refine_messages(CONVERSATION, "9 is not prime. [[2]]", templates)
    assert messages == [
        *CONVERSATION,
        judge_request(templates),
        Message(role="assistant", content="9 is not prime. [[2]]"),
        refine_request(templates),
    ]


@pytest.mark.parametrize("builder", ["critique", "refine"])
def test_message_builders_need_an_assistant_answer_last(builder: str):
    templates = load_templates()
    prompt_only = CONVERSATION[:1]
    with pytest.raises(ValueError, match="assistant"):
        if builder == "critique":
            build_critique_messages(prompt_only, templates)
        else:
            build_refine_messages(prompt_only, "critique", templates)


def test_trajectory_template_renders_every_part_in_order():
    text = load_templates().render(
        "trajectory",
        initial_answer="DRAFT",
        steps=[
            {"critique": "CRIT-1", "refinement": "REV-1"},
            {"critique": "CRIT-2", "refinement": "REV-2"},
        ],
        final_critique="CRIT-LAST",
        marker=FINAL_ANSWER_MARKER,
        final_answer="REV-2",
    )
    order = ["DRAFT", "CRIT-1", "REV-1", "CRIT-2", "REV-2", "CRIT-LAST", FINAL_ANSWER_MARKER]
    positions = [text.index(part) for part in order]
    assert positions == sorted(positions)
    assert text.endswith(f"{FINAL_ANSWER_MARKER}\nREV-2")
    assert extract_final_answer(text) == "REV-2"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Clear and correct. [[8]]", 8),
        ("Rating: [[ 7 ]]", 7),
        ("Rating: [[7/10]]", 7),
        ("Rating: [[ 10 / 10 ]]", 10),
        ("[[1]]", 1),
        ("[[10]]", 10),
        ("[[07]]", 7),
        ("Use the form [[N]]. Weak start [[3]] but overall [[6]]", 6),  # last valid wins
        ("Overall [[6]] then a stray [[11]]", 6),  # out of range skipped
        ("[[0]]", None),
        ("[[11]]", None),
        ("[[7.5]]", None),
        ("[[-3]]", None),
        ("[[7/5]]", None),
        ("[7]", None),
        ("Rating: 7/10", None),
        ("", None),
    ],
)
def test_extract_rating(text: str, expected: int | None):
    assert extract_rating(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"thinking...\n{FINAL_ANSWER_MARKER}\nParis", "Paris"),
        (f"{FINAL_ANSWER_MARKER}  Paris  \n", "Paris"),
        (f"a\n{FINAL_ANSWER_MARKER}\nold\n{FINAL_ANSWER_MARKER}\nnew\nline two", "new\nline two"),
        ("no marker here", None),
        (f"text\n{FINAL_ANSWER_MARKER}\n   \n", None),
        (f"{FINAL_ANSWER_MARKER}", None),
    ],
)
def test_extract_final_answer(text: str, expected: str | None):
    assert extract_final_answer(text) == expected

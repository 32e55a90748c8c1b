"""The run report: a small real run (shards with stats, a partial step, an evaluation) rendered
as one self-contained HTML page, checked in the markup, in headless Chromium, and as a Prefect
artifact."""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import shutil
import signal
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image
from pydantic import BaseModel

from avr_core.evaluation import Estimate, SystemSummary
from avr_core.layout import RunLayout, StepRef
from avr_core.reporting import ShardStats
from avr_core.run_report import (
    EvaluationSection,
    ReportPlot,
    RunReport,
    StepReport,
    render_html,
    render_markdown,
)
from avr_core.schemas import Judgement, PromptRecord
from avr_core.settings import AvrSettings
from avr_core.steps import StepIO
from flows import report as report_flow
from flows.config_files import ConfigError
from flows.report import (
    add_report_arguments,
    build_run_report,
    run_report,
    write_run_report,
)
from tasks.runlog import artifact_key, record_run_start

RUN = "demo-run"
EVAL = "main"
SCRIPT_SYSTEM = "<script>alert('x')</script>"
ODD_STEP = "<b>bold&step"
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ---- a small real run, written with the store's own writers -----------------------------------


class DemoConfig(BaseModel):
    model: str = "tiny"
    shard_size: int = 2


def _prompts(shard: int, count: int) -> list[PromptRecord]:
    return [
        PromptRecord(
            prompt_id=f"p{shard}-{i}", messages=[{"role": "user", "content": f"q{i}"}], source="t"
        )
        for i in range(count)
    ]


def _write_step(store, ref: StepRef, stats: list[ShardStats], rows: int = 2, seal: bool = True):
    fingerprint = f"fp-{ref.step}"
    for index, shard_stats in enumerate(stats):
        store.write_shard(
            RUN,
            *ref,
            index,
            _prompts(index, rows),
            PromptRecord,
            fingerprint,
            stats=shard_stats.model_dump(mode="json", exclude_none=True),
        )
    if seal:
        store.seal(RUN, ref, PromptRecord, fingerprint, range(len(stats)))
    return fingerprint


def _pairs_stats(index: int) -> ShardStats:
    gains = [[0.5, 1.0], [0.0, -0.5], [2.0, 1.0]][index]
    return ShardStats(
        counts={"pairs": 2, "prompt_tokens": 100 + index, "completion_tokens": 200 + index},
        values={"gain": gains},
        seconds={"compute": 1.5, "storage": 0.1},
    )


def _refine_stats(index: int) -> ShardStats:
    scores = [{0: [1.0, 2.0], 1: [2.0, 3.0], 2: [3.0, 3.0]}, {0: [3.0], 1: [4.0], 2: [5.0]}][index]
    values = {f"score_round_{k}": v for k, v in scores.items()}
    values |= {f"answer_chars_round_{k}": [100.0 * (k + 1)] * len(v) for k, v in scores.items()}
    return ShardStats(counts={"prompts": len(scores[0])}, values=values, seconds={"compute": 2.0})


def _judgement(prompt: int, system: str, judge: str, preference: float, score: float | None):
    return Judgement(
        prompt_id=f"p{prompt}",
        system=system,
        baseline="base",
        judge=judge,
        preference=preference,
        candidate_score=score,
        baseline_score=None if score is None else 1.0,
        candidate_chars=100 + prompt,
        baseline_chars=100,
        candidate_response_chars=100 + prompt,
        consistent=True if score is None else None,
    )


def _judgements() -> list[Judgement]:
    rows = []
    for p, preference in enumerate([1.0, 1.0, 0.0, 1.0]):
        rows.append(_judgement(p, "dpo", "pairwise:tiny", preference, None))
        rows.append(_judgement(p, SCRIPT_SYSTEM, "pairwise:tiny", 0.5, None))
        for k in range(3):
            score = 0.5 + k + 0.1 * p
            rows.append(_judgement(p, f"refined@round{k}", "reward:tiny", float(score > 1), score))
    return rows


def _write_evaluation(store) -> None:
    """eval/main as the evaluate task leaves it, then its report through the real report task
    (its artifact call stubbed: no Prefect API here)."""
    from avr_core.config import EvaluationConfig
    from tasks import evaluate

    ref = StepRef("eval", EVAL)
    store.write_shard(RUN, *ref, 0, _judgements(), Judgement, "fp-eval", stats={})
    store.seal(RUN, ref, Judgement, "fp-eval", range(1))
    io_ = StepIO(storage_root=store.root, run=RUN, target=ref)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(evaluate, "create_markdown_artifact", lambda **_: None)
        evaluate.report_task.fn(io_, EvaluationConfig(name=EVAL, resamples=100))


def build_demo_run(root: Path):
    """A run with two sealed steps (one with token counters), a step whose name needs escaping,
    a step 1 of 4 shards done, and an evaluation with its summary and plots."""
    from avr_core.storage import DatasetStore

    store = DatasetStore(str(root))
    record_run_start(store, RUN, "stage1", DemoConfig())
    _write_step(store, StepRef("stage1", "pairs"), [_pairs_stats(i) for i in range(3)])
    _write_step(store, StepRef("testtime", "refine"), [_refine_stats(i) for i in range(2)])
    odd = ShardStats(counts={"prompt_tokens": 7}, seconds={"compute": 0.25})
    _write_step(store, StepRef("stage1", ODD_STEP), [odd], rows=1)
    trees = StepRef("stage1", "trees")
    fingerprint = _write_step(store, trees, [ShardStats(counts={"trees": 3})], rows=3, seal=False)
    # What the step runner writes first: a partial step then reads k of n.
    store.write_json(RunLayout(RUN).step_plan(trees), {"fingerprint": fingerprint, "shards": 4})
    _write_evaluation(store)
    return store


@pytest.fixture(scope="module")
def demo_store(tmp_path_factory: pytest.TempPathFactory):
    return build_demo_run(tmp_path_factory.mktemp("report") / "store")


# ---- reading the page --------------------------------------------------------------------------


class _KeyedCells(HTMLParser):
    """The text of every element with a data-key, by key; and every src/href found."""

    def __init__(self) -> None:
        super().__init__()
        self.cells: dict[str, str] = {}
        self.links: list[str] = []
        self._open: list[str | None] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        self.links += [v or "" for k, v in attrs if k in ("src", "href")]
        if tag in ("td", "th"):
            self._open.append(found.get("data-key"))
            if found.get("data-key"):
                self.cells[found["data-key"]] = ""

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._open:
            self._open.pop()

    def handle_data(self, data: str) -> None:
        if self._open and self._open[-1]:
            self.cells[self._open[-1]] += data


def _cells(page: str) -> _KeyedCells:
    parser = _KeyedCells()
    parser.feed(page)
    return parser


def _check_key_numbers(cells: dict[str, str]) -> None:
    """The figures of the demo run, wherever the page was read from."""
    expected = {
        "rows:stage1/pairs": "6",
        "shards:stage1/pairs": "3",
        "status:stage1/pairs": "sealed",
        "seconds:stage1/pairs": "4.5",
        "prompt_tokens:stage1/pairs": "303",
        "completion_tokens:stage1/pairs": "603",
        "gain_mean:stage1/pairs": "+0.6667",
        "gain_median:stage1/pairs": "+0.7500",
        "prompt_tokens:testtime/refine": "-",
        "status:stage1/trees": "1 of 4 shards",
        "rows:stage1/trees": "3",
        "round:testtime/refine:score:0": "2",
        "round:testtime/refine:score:2": "3.667",
        "round:testtime/refine:answer_chars:1": "200",
        "total:prompt_tokens": "310",
        "total:completion_tokens": "603",
        f"rows:stage1/{ODD_STEP}": "1",
        f"judged:{EVAL}:dpo:pairwise:tiny": "4/4",
    }
    assert {key: cells.get(key) for key in expected} == expected
    assert cells[f"win_rate:{EVAL}:dpo:pairwise:tiny"].startswith("75.0 [")
    assert cells[f"win_rate:{EVAL}:{SCRIPT_SYSTEM}:pairwise:tiny"].startswith("50.0 [")


def _check_self_contained(page: str) -> None:
    links = _cells(page).links
    assert links and all(link.startswith("data:image/png;base64,") for link in links), links
    assert "url(" not in page and "@import" not in page


# ---- the report, built from storage and rendered -----------------------------------------------


def test_report_reads_steps_evaluations_and_plots_from_storage(demo_store) -> None:
    report = build_run_report(demo_store, RUN)
    steps = {step.name: step for step in report.steps}
    assert sorted(steps) == sorted(
        ["eval/main", f"stage1/{ODD_STEP}", "stage1/pairs", "stage1/trees", "testtime/refine"]
    ), "reports/ is not a stage"
    assert steps["stage1/trees"].progress == "1 of 4 shards"
    assert steps["testtime/refine"].round_means["score"] == pytest.approx({0: 2, 1: 3, 2: 11 / 3})
    assert report.flow == "stage1" and report.config == DemoConfig().model_dump()
    (evaluation,) = report.evaluations
    assert {s.system for s in evaluation.summaries} >= {"dpo", SCRIPT_SYSTEM, "refined@round1"}
    assert sorted(p.title for p in evaluation.plots) == ["scaling", "win rate"]
    assert [p.title for p in report.plots] == ["Score per refinement round"]
    assert all(p.png.startswith(PNG_SIGNATURE) for p in [*report.plots, *evaluation.plots])
    # The model crosses task boundaries: PNG bytes survive JSON.
    assert RunReport.model_validate_json(report.model_dump_json()) == report


def test_html_holds_the_key_numbers_escaped_and_self_contained(demo_store) -> None:
    report = build_run_report(demo_store, RUN)
    page = render_html(report)
    _check_key_numbers(_cells(page).cells)
    _check_self_contained(page)
    assert page.count("<img ") == 3
    assert "<script" not in page.lower() and "<b>" not in page
    assert "&lt;script&gt;" in page and "&lt;b&gt;bold&amp;step" in page
    record = demo_store.read_json(RunLayout(RUN).run_record)
    assert _cells(page).cells["git_commit"] == (record["code_version"]["git_commit"] or "-")


def test_pure_rendering_of_a_hand_built_report() -> None:
    estimate = Estimate(value=61.25, ci_low=55.0, ci_high=67.5, n=80)
    summary = SystemSummary(
        system="dpo</td><script>x</script>",
        baseline="base",
        judge="pairwise:m",
        prompts=80,
        judged=78,
        unjudged=2,
        win_rate=estimate,
        lc_win_rate=None,
        candidate_chars=estimate,
        baseline_chars=estimate,
        candidate_response_chars=estimate,
    )
    report = RunReport(
        run="r<1>",
        root="s3://bucket/root",
        steps=[
            StepReport(
                stage="stage1",
                step="trees",
                status="partial",
                shards_done=3,
                shards_total=8,
                rows=30,
                counts={"trees": 30, "completion_tokens": 1234},
                compute_seconds=12.34,
            ),
            StepReport(stage="stage1", step="empty", status="partial", shards_done=2),
        ],
        evaluations=[
            EvaluationSection(
                name="e", summaries=[summary], plots=[ReportPlot(title="t", png=b"x")]
            )
        ],
        config={"note": "</pre><script>y</script>"},
    )
    page = render_html(report)
    cells = _cells(page).cells
    assert cells["status:stage1/trees"] == "3 of 8 shards"
    assert cells["status:stage1/empty"] == "2 shards, not sealed"
    assert cells["rows:stage1/empty"] == "-"
    assert cells["completion_tokens:stage1/trees"] == "1234"
    assert cells["prompt_tokens:stage1/trees"] == "-"
    assert cells["seconds:stage1/trees"] == "12.3"
    system_key = f"e:{summary.system}:pairwise:m"
    assert cells[f"win_rate:{system_key}"] == "61.2 [55.0, 67.5]"
    assert cells[f"lc_win_rate:{system_key}"] == "-"
    assert "<script" not in page
    _check_self_contained(page)

    markdown = render_markdown(report, "s3://bucket/root/runs/r/report.html")
    assert "| stage1/trees | 3 of 8 shards | 30 | 3 | 12.3 | - | 1234 |" in markdown
    assert "<script" not in markdown and "61.2 [55.0, 67.5]" in markdown
    assert "s3://bucket/root/runs/r/report.html" in markdown


def test_page_is_written_to_the_run_or_to_out(demo_store, tmp_path: Path) -> None:
    where = write_run_report(demo_store, RUN)
    assert where == demo_store.uri(f"runs/{RUN}/report.html")
    assert Path(where).read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert [s.stage for s in demo_store.list_steps(RUN)].count("report.html") == 0

    local = tmp_path / "pages" / "run.html"
    assert write_run_report(demo_store, RUN, str(local)) == str(local)
    as_uri = write_run_report(demo_store, RUN, f"file://{tmp_path}/uri.html")
    assert as_uri == f"file://{tmp_path}/uri.html"
    assert local.read_bytes() == (tmp_path / "uri.html").read_bytes()


def test_a_missing_run_is_a_config_error_naming_the_root_and_its_runs(demo_store) -> None:
    with pytest.raises(ConfigError) as raised:
        build_run_report(demo_store, "nope")
    assert demo_store.root in str(raised.value) and RUN in str(raised.value)


def _report_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="avr report")
    add_report_arguments(parser)
    return parser.parse_args(list(argv))


def test_report_command_without_a_prefect_api_writes_only_the_page(
    demo_store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    class NoApi:
        @staticmethod
        def value() -> None:
            return None

    monkeypatch.setattr(report_flow, "PREFECT_API_URL", NoApi)
    out = tmp_path / "page.html"
    args = _report_args(RUN, "--root", demo_store.root, "--out", str(out))
    assert run_report(args, AvrSettings()) == 0
    assert f"run report: {out}" in capsys.readouterr().out
    assert out.exists()
    with pytest.raises(ConfigError, match="no run 'nope'"):
        run_report(_report_args("nope", "--root", demo_store.root), AvrSettings())


# ---- headless Chromium -------------------------------------------------------------------------


def _chromium() -> str:
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    pytest.skip(
        f"no Chromium binary on PATH (tried {', '.join(CHROMIUM_NAMES)}); "
        "install the Debian package `chromium` (CI does)"
    )


def _processes_using(profile: Path) -> list[int]:
    """Processes whose command line names this test's throwaway profile (only ours do)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            if str(profile).encode() in cmdline.read_bytes():
                found.append(int(cmdline.parent.name))
    return found


def _stop_leftovers(group: int, profile: Path) -> None:
    """Kill the browser's process group and any helper that left it; wait until they are gone."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(group, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while (left := _processes_using(profile)) and time.monotonic() < deadline:
        for pid in left:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)


def _run_chromium(binary: str, page: Path, profile: Path, action: str) -> bytes:
    """One headless Chromium run (`--screenshot=...` or `--dump-dom`); its stdout."""
    command = [
        binary,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        f"--user-data-dir={profile}",
        "--window-size=1400,1800",
        "--virtual-time-budget=5000",
        action,
        page.as_uri(),
    ]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )
    try:
        stdout, stderr = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        _stop_leftovers(process.pid, profile)
        process.communicate()
        pytest.fail(f"chromium {action} did not finish in 120 s")
    finally:
        _stop_leftovers(process.pid, profile)
    assert process.returncode == 0, stderr.decode(errors="replace")[-3000:]
    return stdout


def test_page_renders_in_headless_chromium(demo_store, tmp_path: Path) -> None:
    binary = _chromium()
    page = Path(write_run_report(demo_store, RUN))
    profile = tmp_path / "chromium-profile"
    screenshot = tmp_path / "report.png"

    _run_chromium(binary, page, profile, f"--screenshot={screenshot}")
    data = screenshot.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 20_000
    image = Image.open(io.BytesIO(data))
    assert image.size == (1400, 1800)
    colors = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colors is not None and len(colors) > 50, "a blank screenshot"

    dom = _run_chromium(binary, page, profile, "--dump-dom").decode("utf-8")
    _check_key_numbers(_cells(dom).cells)
    assert len(re.findall(r'<img [^>]*src="data:image/png;base64,', dom)) == 3
    assert "<script" not in dom.lower()
    assert _processes_using(profile) == [], "a Chromium process outlived the test"


# ---- the Prefect artifact ----------------------------------------------------------------------


def _artifact_markdown(key: str) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key]))
        )
    assert found, f"no artifact {key!r}"
    return str(found[-1].data)


@pytest.mark.slow
def test_report_command_publishes_the_artifact(
    prefect_harness: Path, demo_store, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """`avr report` against a (test-harness) Prefect API: the page, then the markdown artifact."""
    out = tmp_path / "page.html"
    args = _report_args(RUN, "--root", demo_store.root, "--out", str(out))
    assert run_report(args, AvrSettings()) == 0
    key = artifact_key(RUN, "run-report")
    assert f"artifact: {key}" in capsys.readouterr().out
    markdown = _artifact_markdown(key)
    assert "| stage1/pairs | sealed | 6 | 3 | 4.5 | 303 | 603 | +0.6667 | +0.7500 |" in markdown
    assert "| stage1/trees | 1 of 4 shards | 3 |" in markdown
    assert "| dpo | pairwise:tiny | 4/4 | 75.0 [" in markdown
    assert str(out) in markdown and "<script" not in markdown

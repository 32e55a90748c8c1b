"""The `avr` command: run flows from config files, inspect stored runs, render deployments, local UI.

    avr demo                                   Stage I end to end with the tiny config (CPU)
    avr run FLOW --config FILE [--set k=v]...  any flow, config file + dotted overrides
    avr runs [--root URI]                      runs in a storage root, per-step status and rows
    avr show RUN [STEP] [--root URI]           run.json, or a step's manifest, schema, sample rows
    avr plan FLOW --config FILE [--preview N]  what a run will generate and take; N prompts first
    avr report RUN [--root URI] [--out PATH]   one HTML page of a run (+ a Prefect artifact)
    avr export RUN STEP --format F --out URI   a sealed step as trl, llamafactory, openrlhf,
                                               sharegpt, jsonl or alpaca-eval data
    avr ui [--port N]                          a local Prefect server + workers on cpu and gpu
    avr workers --gpus N [--pool gpu]          print the commands for one worker per GPU
    avr render-deployments [--check]           write deployments/prefect.yaml from the configs

SIGTERM stops any command as Ctrl-C does, cleanup included: `avr ui` then exits with 0, other
commands with 143 (130 after Ctrl-C). Servers and workers started here stop when `avr` dies, even
by SIGKILL (flows/local_prefect.py).

Config files (deployments/configs/*.yaml) nest like the flow parameters (`ingest:`, `policy:`,
`tree:`, ...); each flow takes the sections it has. `--set tree.sampling.max_tokens=64`
overrides one field, read against that field's type (flows/config_files.py); a key that does not
exist or a value of the wrong type fails before anything runs, naming the key.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

# Set before the imports below, which import prefect, tqdm and huggingface_hub (through the flow
# modules): each reads these once, when first imported. The temporary Prefect server that
# `avr demo` / `avr run` start (local_prefect.temporary_api) inherits them too: analytics off
# (its telemetry service printed "database is locked" tracebacks from the SQLite file), and time
# for a first start, which creates that database (over Prefect's 20 s on a busy 2-core machine).
# Without a terminal (CI, logs) model-loading and trainer progress bars would fill the log with
# carriage returns; the trainer child inherits these.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
if not sys.stderr.isatty():
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

from pydantic import ValidationError
from pydantic_settings import SettingsError

from avr_core.settings import AvrSettings
from flows.config_files import (
    TINY_CONFIG,
    ConfigError,
    build_params,
    check_keys,
    check_models,
    load_config,
)
from flows.deployments import FLOWS, PARAM_NAME, get_flow, render_deployments
from flows.export import add_export_arguments, run_export
from flows.inspect_runs import open_store, print_outputs, print_runs, print_show
from flows.local_prefect import (
    Terminated,
    interrupt_on_sigterm,
    run_ui,
    temporary_api,
    worker_commands,
)
from flows.preview import add_plan_arguments, run_plan
from flows.report import add_report_arguments, run_report

__all__ = ["main", "run_demo", "run_flow"]


def _settings() -> AvrSettings:
    """The infrastructure settings (AVR_* variables), read once per command."""
    try:
        return AvrSettings()
    except (ValidationError, SettingsError) as err:
        raise ConfigError(f"environment: {err}") from err


def run_flow(
    name: str, config_path: str | Path | None, overrides: Sequence[str], settings: AvrSettings
) -> int:
    """Validate parameters, check models, run the flow in this process, print its outputs."""
    entry = get_flow(name)
    config = load_config(config_path) if config_path else {}
    check_keys(config, [e.params_model for e in FLOWS], source=str(config_path))
    params = build_params(entry.params_model, config, overrides)
    check_models(params)
    print(f"running flow {entry.name} ({entry.entrypoint})")
    with temporary_api():  # a server that dies with this process, unless an API is configured
        result = entry.flow(**{PARAM_NAME: params})
    print_outputs(params, result, settings)
    return 0


def run_demo(root: str | None, overrides: Sequence[str], settings: AvrSettings) -> int:
    """`avr demo`: Stage I on the tiny config, in-process with a temporary Prefect API."""
    extra = [f"storage_root={root}"] if root else []
    return run_flow("stage1", TINY_CONFIG, [*extra, *overrides], settings)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="avr", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    set_help = "override one field, dotted, e.g. --set tree.sampling.max_tokens=64 (repeatable)"

    demo = sub.add_parser("demo", help="Stage I end to end with the tiny config, on this machine")
    demo.add_argument("--root", help="storage root (default: ./avr-output)")
    demo.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=set_help
    )

    run = sub.add_parser("run", help="run a flow in this process with a config file")
    run.add_argument("flow", help=f"flow name: {', '.join(e.name for e in FLOWS)}")
    run.add_argument("--config", help="YAML config, e.g. deployments/configs/tiny.yaml")
    run.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=set_help
    )

    runs = sub.add_parser("runs", help="list the runs in a storage root")
    runs.add_argument("--root", default="avr-output", help="storage root (default: ./avr-output)")

    show = sub.add_parser("show", help="show a run, or one step's manifest, schema and rows")
    show.add_argument("run", help="run name (see `avr runs`)")
    show.add_argument("step", nargs="?", help="stage/step or a unique step name")
    show.add_argument("--root", default="avr-output", help="storage root (default: ./avr-output)")
    show.add_argument("--rows", type=int, default=3, help="sample rows to print")
    show.add_argument("--width", type=int, default=300, help="cut strings longer than this")

    plan = sub.add_parser(
        "plan", help="estimate a run (engine calls, tokens, time); --preview N runs N prompts"
    )
    add_plan_arguments(plan, set_help)

    report = sub.add_parser("report", help="write a run's HTML report (and its Prefect artifact)")
    add_report_arguments(report)

    export = sub.add_parser(
        "export", help="write a sealed step in a trainer's or evaluator's dataset format"
    )
    add_export_arguments(export)

    ui = sub.add_parser("ui", help="start a local Prefect server and workers, print the URL")
    ui.add_argument("--port", type=int, default=4200, help="server port (default: 4200)")
    ui.add_argument("--home", help="PREFECT_HOME for the server state (default: ~/.prefect)")
    ui.add_argument("--no-deploy", action="store_true", help="do not deploy prefect.yaml")

    workers = sub.add_parser(
        "workers", help="print the commands that start one process worker per GPU of this box"
    )
    workers.add_argument("--gpus", type=int, required=True, help="GPUs of this box")
    workers.add_argument("--pool", default="gpu", help="work pool (default: gpu)")
    workers.add_argument(
        "--gpus-per-worker",
        type=int,
        default=1,
        help="GPUs per worker, e.g. 2 for a tensor_parallel_size=2 model (default: 1)",
    )

    render = sub.add_parser("render-deployments", help="write deployments/prefect.yaml")
    render.add_argument("--check", action="store_true", help="fail if prefect.yaml is out of date")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point (`avr`); returns the exit status (2 for a config or usage error,
    130 after Ctrl-C, 143 after SIGTERM)."""
    args = _parser().parse_args(argv)
    try:
        with interrupt_on_sigterm():
            return _dispatch(args)
    except ConfigError as err:
        print(f"avr: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:
        terminated = isinstance(stop, Terminated)
        print(f"avr: stopped ({'SIGTERM' if terminated else 'Ctrl-C'})", file=sys.stderr)
        return 128 + (signal.SIGTERM if terminated else signal.SIGINT)


def _dispatch(args: argparse.Namespace) -> int:
    """Run the chosen command; its exit status."""
    if args.command == "demo":
        return run_demo(args.root, args.overrides, _settings())
    if args.command == "run":
        return run_flow(args.flow, args.config, args.overrides, _settings())
    if args.command == "runs":
        return print_runs(open_store(args.root, _settings()))
    if args.command == "show":
        store = open_store(args.root, _settings())
        return print_show(store, args.run, args.step, args.rows, args.width)
    if args.command == "plan":
        return run_plan(args, _settings())
    if args.command == "report":
        return run_report(args, _settings())
    if args.command == "export":
        return run_export(args, _settings())
    if args.command == "ui":
        return run_ui(args.port, args.home, not args.no_deploy)
    if args.command == "workers":
        try:
            print("\n".join(worker_commands(args.gpus, args.pool, args.gpus_per_worker)))
        except ValueError as err:
            raise ConfigError(str(err)) from err
        return 0
    if args.command == "render-deployments":
        return render_deployments(args.check)
    raise AssertionError(f"unhandled command {args.command}")


if __name__ == "__main__":
    sys.exit(main())

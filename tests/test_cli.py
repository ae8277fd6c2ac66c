"""One CLI layer: ``--task`` and its older spellings, one line for an unknown task, exit codes from exception types.

No Ray and no LM here: parsing, error reporting and a run record from before ``pipeline`` became ``task``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from dspy_ray.util.cli import EXIT_BUDGET, EXIT_ENDPOINT, EXIT_USAGE, endpoint_flags, report_error

ROOT = Path(__file__).resolve().parents[1]
BATCH_IO = ["--input", "in.jsonl", "--output", "out"]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LM_", "JUDGE_", "EMBED_", "RAY_ADDRESS"))}
    return {**env, "PYTHONPATH": str(ROOT)}


# -- the task, however it is spelled ------------------------------------------------------------------


def _batch(spelling: str, task: str, extra: list[str]):
    from pipelines.__main__ import task_argv
    from pipelines.cli import parse_args

    if spelling == "--task":
        return parse_args(None, ["--task", task, *BATCH_IO, *extra], None)
    if spelling == "positional":  # python -m pipelines triage ...
        return parse_args(None, task_argv([task, *BATCH_IO, *extra]), None)
    return parse_args(task, [*BATCH_IO, *extra], f"python -m pipelines.{task}")  # python -m pipelines.triage


def _optimize(spelling: str, task: str, extra: list[str]):
    from optimize.__main__ import parse_args

    return parse_args([spelling, task, *extra])


def _serve(spelling: str, task: str, extra: list[str]):
    from serve.__main__ import parse_args

    return parse_args([spelling, task, *extra])


SPELLINGS = [(_batch, ("--task", "positional", "module")), (_optimize, ("--task", "--pipeline")),
             (_serve, ("--task", "--program"))]


@pytest.mark.parametrize(("parse", "spellings"), SPELLINGS, ids=["pipelines", "optimize", "serve"])
@pytest.mark.parametrize("name", ["triage", "rag"])
def test_every_spelling_of_the_task_parses_the_same(parse, spellings, name):
    extra = ["--index", "some/index"] if name == "rag" else []
    parsed = [parse(spelling, name, extra) for spelling in spellings]
    assert {task.name for _, task in parsed} == {name}
    assert {getattr(args, "task", name) for args, _ in parsed} == {name}  # python -m pipelines.X has no --task
    if name == "rag":  # the task's own flags joined the parser, whichever spelling named it
        assert [task.resource_settings(args) for args, task in parsed] == [{"retriever": "some/index"}] * len(parsed)


@pytest.mark.parametrize(("parse", "spellings"), SPELLINGS, ids=["pipelines", "optimize", "serve"])
def test_endpoint_flags_are_the_same_in_every_cli(parse, spellings):
    flags = ["--lm-base-url", "http://lm/v1", "--lm-model", "m", "--embed-base-url", "http://e/v1",
             "--embed-model", "e5", "--index", "some/index"]
    args, _ = parse(spellings[0], "rag", flags)
    assert endpoint_flags(args, "LM")["base_url"] == "http://lm/v1" and endpoint_flags(args, "LM")["model"] == "m"
    assert endpoint_flags(args, "EMBED") == {"base_url": "http://e/v1", "model": "e5"}
    _, triage = parse(spellings[0], "triage", [])
    assert not triage.needs_embedder  # ... and a task that embeds nothing has no embedding flags
    with pytest.raises(SystemExit):
        parse(spellings[0], "triage", ["--embed-model", "e5"])


@pytest.mark.parametrize("argv", [
    ["optimize", "--task", "triage", "--workers", "0"],
    ["optimize", "--task", "triage", "--lm-max-in-flight", "-1"],
    ["serve", "--task", "triage", "--drift-min-samples", "0"],
    ["pipelines", "--task", "triage", *BATCH_IO, "--num-actors", "0"],
])
def test_counts_below_one_are_usage_errors(argv, capsys):
    from optimize.__main__ import parse_args as optimize_args
    from pipelines.cli import parse_args as batch_args
    from serve.__main__ import parse_args as serve_args

    parse = {"optimize": optimize_args, "serve": serve_args, "pipelines": lambda a: batch_args(None, a, None)}
    with pytest.raises(SystemExit) as exit_info:
        parse[argv[0]](argv[1:])
    assert exit_info.value.code == EXIT_USAGE and "must be 1 or more" in capsys.readouterr().err


# -- an unknown task ------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [
    ["pipelines", "--task", "nope", *BATCH_IO],
    ["pipelines", "nope", *BATCH_IO],
    ["optimize", "--task", "nope"],
    ["optimize", "--pipeline", "nope"],
    ["serve", "--task", "nope"],
    ["serve", "--program", "nope"],
])
def test_an_unknown_task_exits_2_with_one_line(argv, capsys):
    from optimize.__main__ import main as optimize_main
    from pipelines.__main__ import main as batch_main
    from serve.__main__ import main as serve_main

    main = {"pipelines": batch_main, "optimize": optimize_main, "serve": serve_main}[argv[0]]
    with pytest.raises(SystemExit) as exit_info:
        main(argv[1:])
    assert exit_info.value.code == EXIT_USAGE
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unknown task 'nope'"), lines


def test_an_unknown_task_on_the_command_line(capsys):
    """The same through ``python -m`` (whatever the imports log, stderr is one line), and for a fixed task."""
    from pipelines.cli import main

    assert main("nope", BATCH_IO) == EXIT_USAGE
    assert capsys.readouterr().err.strip().startswith("error: unknown task 'nope'")
    for module, flag in (("optimize", "--task"), ("serve", "--program")):
        proc = subprocess.run([sys.executable, "-m", module, flag, "nope"], cwd=ROOT, env=_env(),
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == EXIT_USAGE, proc.stderr[-2000:]
        assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "unknown task 'nope'" in proc.stderr


# -- exit codes belong to exception types ---------------------------------------------------------------


def _validation_error() -> ValidationError:
    from optimize.config import OptimizeConfig

    try:
        OptimizeConfig(task="triage", workers=0)
    except ValidationError as exc:
        return exc
    raise AssertionError("workers=0 was accepted")


def test_report_error_maps_exception_types_to_exit_codes(capsys):
    from optimize.config import OptimizeError
    from optimize.mipro import SearchError
    from optimize.run import EndpointFailed, TooManyCalls
    from pipelines.inputs import InputError
    from tasks import TaskError
    from tasks.examples import DatasetError

    cases = [(TaskError("unknown task 'x'"), EXIT_USAGE), (InputError("in.jsonl line 2: invalid JSON"), EXIT_USAGE),
             (DatasetError("the dev set is empty"), EXIT_USAGE), (OptimizeError("set --auto"), EXIT_USAGE),
             (_validation_error(), EXIT_USAGE), (TooManyCalls("estimated 9 LM calls"), EXIT_BUDGET),
             (SearchError("every LM call of trial 3 failed"), EXIT_ENDPOINT),
             (EndpointFailed("every LM call of the baseline dev evaluation failed"), EXIT_ENDPOINT)]
    for exc, code in cases:
        assert report_error(exc) == code, exc
        err = capsys.readouterr().err
        assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    report_error(_validation_error())
    assert "workers: Input should be greater than or equal to 1" in capsys.readouterr().err
    # The code is the type's, never the message's: an endpoint failure is 4 whatever it says.
    assert report_error(EndpointFailed("it broke")) == EXIT_ENDPOINT
    assert report_error(OptimizeError("every LM call failed")) == EXIT_USAGE
    with pytest.raises(KeyError):  # a bug declares no code: it is shown in full, not as one line
        report_error(KeyError("x"))
    assert report_error(FileNotFoundError("models.yaml"), usage=(OSError,)) == EXIT_USAGE


# -- optimize: the task field and runs saved before it was named so ----------------------------------


def test_a_run_saved_with_pipeline_still_resumes():
    from optimize.config import OptimizeConfig
    from optimize.run import check_run
    from optimize.storage import RunStorage

    cfg = OptimizeConfig(pipeline="triage", resume=True)  # the old name of the field still reads
    assert cfg.task == "triage" and "--task triage" in cfg.command()
    fields = cfg.fingerprint_fields("hash", "model")
    old = {("pipeline" if k == "task" else k): v for k, v in fields.items()}
    storage = RunStorage("memory://runs/test-cli-old-run")
    storage.write_json("run.json", {"fingerprint_fields": old, "config": {"pipeline": "triage"}})
    check_run(storage, cfg, fields)  # no error: the same settings
    with pytest.raises(Exception, match="task: 'triage' then, 'rag' now"):
        check_run(storage, cfg, {**fields, "task": "rag"})

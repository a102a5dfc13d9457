"""Bad input: every mistake of a user ends with exit status 2 and one message that names
the key (and the file, line and value where there are some) and the fix, without a
traceback, and leaves the run directory exactly as it was.

``CASES`` is the table of docs/bad-input.md. Most cases run the real entry point
in-process through ``run_cli`` (fast); the ones marked ``cli`` run it as a user does, in
a subprocess, to prove the exit status and the absence of a traceback end to end.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from mtl_dist.config import Config, DataConfig, TaskConfig
from mtl_dist.data import build_label_maps, eval_batches, load_raw, tokenize
from mtl_dist.errors import ConfigError
from mtl_dist.run import EXIT_USER_ERROR, run_cli
from mtl_dist.train import main as train_main
from mtl_dist.trainer import Trainer, plan_batches
from tests.conftest import (
    REPO,
    make_rows,
    run_module,
    tiny_args,
    write_jsonl,
)

# ---------------------------------------------------------------------------------------
# Building bad inputs.


@dataclass
class Env:
    """What a case may use and change: the tiny model, a clean temporary directory and
    the run's output directory (a copy of a finished run for cases with ``needs_run``;
    a case may point it elsewhere)."""

    model: Path
    tmp: Path
    out: Path


def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def delimited(rows: list[dict], sep: str) -> str:
    text = io.StringIO()
    writer = csv.DictWriter(
        text, fieldnames=list(rows[0]), delimiter=sep, lineterminator="\n"
    )
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue()


def data_dir(env: Env, ext: str = ".jsonl", **splits: str | bytes | list[dict]) -> str:
    """A data directory with the given splits (rows, text or bytes); train defaults to
    24 good rows."""
    directory = env.tmp / "data"
    directory.mkdir(exist_ok=True)
    splits.setdefault("train", make_rows(24, 1))
    for split, content in splits.items():
        if isinstance(content, list):
            content = (
                jsonl(content) if ext.endswith("jsonl") else delimited(content, ",")
            )
        path = directory / f"{split}{ext}"
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
    return str(directory)


def with_rows(n: int = 24, **changes: dict) -> list[dict]:
    """Good rows, with ``changes`` ({"3": {...}}: 1-based row -> fields) applied."""
    rows = make_rows(n, 1)
    for number, update in changes.items():
        rows[int(number.lstrip("r")) - 1].update(update)
    return rows


def dataset(env: Env, ext: str = ".jsonl", **splits) -> list[str]:
    return ["--data.dataset", data_dir(env, ext, **splits)]


def file_in_tmp(env: Env, name: str, content: str | bytes) -> str:
    path = env.tmp / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return str(path)


def latin1_train(env: Env) -> list[str]:
    good = jsonl(make_rows(3, 1)).encode()
    bad = '{"text": "caf\xe9 was great", "topic": "food", "mood": "positive"}\n'
    return dataset(env, train=good + bad.encode("latin-1") + good)


def semicolon_csv(env: Env) -> list[str]:
    return dataset(env, ".csv", train=delimited(make_rows(24, 1), ";"))


def comma_tsv(env: Env) -> list[str]:
    return dataset(env, ".tsv", train=delimited(make_rows(24, 1), ","))


def ragged_csv(env: Env, line: int = 4) -> list[str]:
    lines = delimited(make_rows(24, 1), ",").splitlines(keepends=True)
    lines[line - 1] = lines[line - 1].rstrip("\n") + ",extra\n"
    return dataset(env, ".csv", train="".join(lines))


def broken_json_document(env: Env) -> list[str]:
    text = json.dumps(make_rows(4, 1), indent=1)
    path = file_in_tmp(env, "train.json", text[: text.rindex("}")])  # cut at the end
    return ["--data.train_file", path]


def model_without_weights(env: Env) -> list[str]:
    return ["--model.random_init", "false"]


def remote_code_model(env: Env) -> list[str]:
    directory = env.tmp / "remote_code_model"
    directory.mkdir()
    config = {
        "model_type": "mtl-test-remote",
        "auto_map": {"AutoConfig": "remote.RemoteConfig"},
    }
    (directory / "config.json").write_text(json.dumps(config))
    # Importing this module is the code a hub model would run: it must never run.
    (directory / "remote.py").write_text(
        f"open({str(env.tmp / 'REMOTE_CODE_RAN')!r}, 'w').close()\n"
    )
    return ["--model.name_or_path", str(directory)]


def ds_json(env: Env, text: str) -> list[str]:
    return ["--deepspeed", file_in_tmp(env, "ds.json", text)]


def under_a_file(env: Env) -> list[str]:
    blocker = env.tmp / "a_file"
    blocker.write_text("not a directory\n")
    # Root may write anywhere, so a permission bit would prove nothing here; a path
    # through a regular file cannot be created by anyone.
    env.out = blocker / "run"
    return []


def relabelled_data(env: Env) -> list[str]:
    """The finished run's data with one mood label renamed: other label maps."""
    rows = make_rows(96, 1)
    for row in rows:
        row["mood"] = {"positive": "upbeat"}.get(row["mood"], row["mood"])
    directory = env.tmp / "relabelled"
    directory.mkdir()
    write_jsonl(directory / "train.jsonl", rows)
    return ["--data.dataset", str(directory), "--overwrite", "true", "--resume", "auto"]


def unfinished(env: Env) -> list[str]:
    shutil.rmtree(env.out / "model")
    return []


@dataclass(frozen=True)
class Case:
    id: str
    what: str
    """The mistake, as the documentation's table names it."""
    build: Callable[[Env], list[str]]
    """Makes the input in ``env.tmp``; returns the flags added to the tiny run's."""
    expect: tuple[str, ...]
    """Fragments the error message must hold: the key, file, line, value, fix."""
    cli: bool = False
    """Run in a subprocess, as a user does."""
    needs_run: bool = False
    """``env.out`` starts as a copy of a finished run (with checkpoints)."""


ROWS = make_rows(24, 1)

CASES = [
    # Files.
    Case(
        "missing_file",
        "a split file that does not exist",
        lambda e: ["--data.train_file", str(e.tmp / "nope.jsonl")],
        ("data.train_file=", "nope.jsonl", "file not found"),
    ),
    Case(
        "directory_as_file",
        "a directory where a file is expected",
        lambda e: ["--data.train_file", str(e.tmp)],
        ("data.train_file=", "is a directory", "not a directory"),
    ),
    Case(
        "file_as_dataset_directory",
        "a file where the data directory is expected",
        lambda e: ["--data.dataset", file_in_tmp(e, "train.jsonl", jsonl(ROWS))],
        ("data.dataset=", "is a file", "--data.train_file"),
    ),
    Case(
        "unsupported_extension",
        "an unsupported file extension",
        lambda e: ["--data.train_file", file_in_tmp(e, "train.xlsx", "x")],
        ("data.train_file=", "train.xlsx", "unknown file format", ".jsonl"),
    ),
    Case(
        "empty_file",
        "an empty file",
        lambda e: dataset(e, train=""),
        ("data.train_file=", "train.jsonl", "the file is empty"),
    ),
    Case(
        "whitespace_only_file",
        "a file of blank lines",
        lambda e: dataset(e, validation="\n   \n\n"),
        ("data.validation_file=", "validation.jsonl", "the file is empty"),
    ),
    Case(
        "header_only_csv",
        "a CSV file with a header and no rows",
        lambda e: dataset(e, ".csv", train="id,text,topic,mood\n"),
        ("data.train_file=", "train.csv", "the file has no rows"),
    ),
    Case(
        "malformed_jsonl_line",
        "a malformed JSONL line",
        lambda e: dataset(
            e, train=jsonl(ROWS[:4]) + '{"text": "oops",\n' + jsonl(ROWS)
        ),
        ("data.train_file=", "train.jsonl", "line 5, column", "not valid JSON"),
        cli=True,
    ),
    Case(
        "jsonl_line_not_an_object",
        "a JSONL line that is not an object",
        lambda e: dataset(e, train=jsonl(ROWS[:2]) + "[1, 2]\n" + jsonl(ROWS)),
        ("data.train_file=", "line 3 holds an array, not an object"),
    ),
    Case(
        "malformed_json_document",
        "a .json document cut short",
        broken_json_document,
        ("data.train_file=", "train.json", "not valid JSON: line", "column"),
    ),
    Case(
        "non_utf8_bytes",
        "non-UTF-8 bytes (Latin-1)",
        latin1_train,
        ("data.train_file=", "not UTF-8: byte 0xe9 at line 4", "byte offset", "iconv"),
    ),
    Case(
        "non_utf8_csv",
        "non-UTF-8 bytes in a CSV validation file",
        lambda e: dataset(
            e,
            ".csv",
            train=delimited(ROWS, ","),
            validation=delimited(with_rows(5, r3={"text": "na\xefve"}), ",").encode(
                "latin-1"
            ),
        ),
        ("data.validation_file=", "validation.csv", "not UTF-8", "line 4"),
    ),
    Case(
        "csv_wrong_delimiter",
        "a CSV file separated by semicolons",
        semicolon_csv,
        ("data.text_column=", "train.csv", "separated by ';', not by ','", ".tsv"),
    ),
    Case(
        "tsv_with_commas",
        "a .tsv file separated by commas",
        comma_tsv,
        ("data.text_column=", "train.tsv", "separated by ','", ".csv"),
    ),
    Case(
        "ragged_csv_row",
        "a CSV row with more fields than the header",
        ragged_csv,
        ("data.train_file=", "train.csv", "line 4 has 5 fields, the header 4"),
    ),
    Case(
        "ragged_csv_first_row",
        "a first CSV row with more fields than the header (pandas would make an index)",
        lambda e: ragged_csv(e, line=2),
        ("data.train_file=", "train.csv", "line 2 has 5 fields, the header 4"),
    ),
    # Columns and labels.
    Case(
        "missing_text_column",
        "a missing text column",
        lambda e: ["--data.text_column", "sentence"],
        ("data.text_column='sentence'", "no such column", "train.jsonl", "'text'"),
    ),
    Case(
        "missing_label_column",
        "a missing label column",
        lambda e: ["--tasks", "topic,nope"],
        ("tasks.nope.label_column='nope'", "no such column", "'mood'"),
    ),
    Case(
        "label_column_missing_in_validation",
        "a label column present in train, absent in validation",
        lambda e: dataset(
            e, validation=[{k: v for k, v in r.items() if k != "mood"} for r in ROWS]
        ),
        ("tasks.mood.label_column='mood'", "validation split"),
    ),
    Case(
        "unseen_label_in_validation",
        "a validation label never seen in train",
        lambda e: dataset(e, validation=with_rows(5, r2={"topic": "music"})),
        ("tasks.topic.labels='music'", "validation split never seen in train"),
    ),
    Case(
        "label_outside_fixed_labels",
        "a train label outside the task's fixed `labels`",
        lambda e: [
            "--tasks",
            '[{"name": "topic", "labels": ["food", "sport"]}, {"name": "mood"}]',
        ],
        ("tasks.topic.labels='tech'", "not in tasks.topic.labels"),
    ),
    Case(
        "task_without_labels",
        "a task with no labels at all",
        lambda e: dataset(e, train=[{**r, "mood": None} for r in ROWS]),
        ("tasks.mood.label_column='mood'", "found 0 distinct label(s)"),
    ),
    Case(
        "task_with_one_label",
        "a task with a single class",
        lambda e: dataset(e, train=[{**r, "mood": "meh"} for r in ROWS]),
        ("tasks.mood.label_column='mood'", "found 1 distinct label(s)"),
    ),
    Case(
        "label_not_a_scalar",
        "a label that is a list",
        lambda e: dataset(e, train=with_rows(r5={"topic": ["food", "tech"]})),
        ("tasks.topic.label_column='topic'", "holds an array", "a string or a number"),
    ),
    Case(
        "empty_text",
        "empty, whitespace-only or null text",
        lambda e: dataset(
            e, train=with_rows(r3={"text": ""}, r7={"text": "  \t"}, r9={"text": None})
        ),
        ("data.text_column='text'", "empty or whitespace-only text at lines 3, 7, 9"),
    ),
    Case(
        "text_not_a_string",
        "text that is a number",
        lambda e: dataset(e, train=with_rows(r4={"text": 42})),
        ("data.text_column='text'", "not text at line 4", "a number"),
    ),
    # Tasks and run settings.
    Case(
        "zero_tasks",
        "zero tasks",
        lambda e: ["--tasks", ""],
        ("tasks=[]", "configure at least one task"),
    ),
    Case(
        "duplicate_task_names",
        "duplicate task names",
        lambda e: ["--tasks", "topic,topic"],
        ("tasks=['topic']", "duplicate task names"),
    ),
    Case(
        "batch_size_zero",
        "a batch size out of range",
        lambda e: ["--global_batch_size", "0"],
        ("global_batch_size=0", "use a value > 0"),
    ),
    Case(
        "batch_larger_than_train",
        "a global batch larger than the train split",
        lambda e: ["--global_batch_size", "1000"],
        ("global_batch_size=1000", "larger than the train split", "at most 96"),
    ),
    Case(
        "learning_rate_out_of_range",
        "a learning rate out of range",
        lambda e: ["--lr", "3"],
        ("lr=3.0", "use a learning rate in (0, 1)"),
    ),
    Case(
        "dwa_that_never_moves",
        "dwa with one loss point per epoch in a run of two epochs or fewer",
        lambda e: ["--weighting.method", "dwa", "--epochs", "2"],
        ("weighting.dwa_interval=0", "would train as `sum`", "a number of steps"),
    ),
    Case(
        "compile_value",
        "a compile setting that is none of auto, true, false",
        lambda e: ["--compile", "sometimes"],
        ("compile='sometimes'", "use auto, true or false"),
    ),
    Case(
        "epochs_zero",
        "epochs out of range",
        lambda e: ["--epochs", "0"],
        ("epochs=0", "use a value > 0"),
    ),
    Case(
        "max_length_above_positions",
        "max_length above the model's position limit",
        lambda e: ["--data.max_length", "512"],
        ("data.max_length=512", "max_position_embeddings (128)", "at most 128"),
        cli=True,
    ),
    Case(
        "fp16_on_cpu",
        "fp16 on a CPU",
        lambda e: ["--precision", "fp16"],
        ("precision='fp16'", "needs a GPU", "bf16"),
        cli=True,
    ),
    Case(
        "bad_yaml_config",
        "a config file that is not YAML",
        lambda e: ["--config", file_in_tmp(e, "c.yaml", "epochs: [1,\n")],
        ("--config=", "not valid YAML"),
    ),
    Case(
        "unknown_config_key",
        "an unknown key in the config file",
        lambda e: ["--config", file_in_tmp(e, "c.yaml", "max_step: 3\n")],
        ("max_step=3", "unknown key", "did you mean 'max_steps'"),
    ),
    # Model.
    Case(
        "model_path_missing",
        "a model path that does not exist",
        lambda e: ["--model.name_or_path", str(e.tmp / "no_model")],
        ("model.name_or_path=", "no_model", "no such directory", "local model"),
    ),
    Case(
        "model_dir_without_config",
        "a model directory without config.json",
        lambda e: ["--model.name_or_path", str(e.tmp)],
        ("model.name_or_path=", "no config.json there"),
    ),
    Case(
        "model_dir_without_weights",
        "a model directory without weights",
        model_without_weights,
        ("model.name_or_path=", "no weights", "model.safetensors", "random_init"),
    ),
    Case(
        "hub_name_offline",
        "a hub model name while offline",
        lambda e: ["--model.name_or_path", "someone/not-cached-model"],
        ("model.name_or_path='someone/not-cached-model'", "HF_HUB_OFFLINE", "local"),
        cli=True,
    ),
    Case(
        "remote_code_refused",
        "a model that needs its own code, trust_remote_code off",
        remote_code_model,
        ("model.name_or_path=", "own Python code", "--model.trust_remote_code true"),
    ),
    # DeepSpeed.
    Case(
        "deepspeed_file_missing",
        "a DeepSpeed config that does not exist",
        lambda e: ["--deepspeed", str(e.tmp / "zero9.json")],
        ("deepspeed=", "zero9.json", "file not found"),
    ),
    Case(
        "deepspeed_malformed_json",
        "a malformed DeepSpeed JSON",
        lambda e: ds_json(e, '{\n  "zero_optimization": {"stage": 2,}\n}\n'),
        ("deepspeed=", "malformed JSON", "line 2, column"),
    ),
    Case(
        "deepspeed_no_such_stage",
        "a ZeRO stage that does not exist",
        lambda e: ds_json(e, '{"zero_optimization": {"stage": 7}}'),
        ("zero_optimization.stage=7", "no such ZeRO stage", "(0, 1, 2, 3)"),
    ),
    # Output directory and resume.
    Case(
        "output_dir_not_writable",
        "an output directory that cannot be written",
        under_a_file,
        ("output_dir=", "not writable (Not a directory)"),
        cli=True,
    ),
    Case(
        "output_dir_with_another_config",
        "an output directory holding a run with another config",
        lambda e: ["--lr", "2e-3"],
        ("output_dir=", "another config (differs in: lr)", "--overwrite true"),
        needs_run=True,
    ),
    Case(
        "output_dir_with_unfinished_run",
        "an output directory holding an unfinished run, no --resume",
        unfinished,
        ("output_dir=", "unfinished run with checkpoints", "--resume auto"),
        needs_run=True,
    ),
    Case(
        "resume_with_other_tasks",
        "resuming a checkpoint of other tasks",
        lambda e: ["--tasks", "topic", "--overwrite", "true", "--resume", "auto"],
        ("tasks=['topic']", "differ from the tasks ['topic', 'mood']", "checkpoint"),
        needs_run=True,
    ),
    Case(
        "resume_with_other_labels",
        "resuming a checkpoint of other labels",
        relabelled_data,
        ("tasks.mood.labels=['negative', 'upbeat']", "differ from the labels"),
        needs_run=True,
    ),
    Case(
        "resume_with_another_seed",
        "resuming a checkpoint written with another seed (another data order)",
        lambda e: ["--seed", "7", "--overwrite", "true", "--resume", "auto"],
        ("seed=7", "differs from the checkpoint", "the value 42"),
        needs_run=True,
    ),
    Case(
        "resume_with_another_weighting",
        "resuming a checkpoint of another loss weighting method",
        lambda e: [
            "--weighting.method",
            "dwa",
            "--weighting.dwa_interval",
            "1",
            "--overwrite",
            "true",
            "--resume",
            "auto",
        ],
        ("weighting.method='dwa'", "differs from the checkpoint", "'sum'"),
        needs_run=True,
    ),
    Case(
        "resume_not_a_checkpoint",
        "--resume with a directory that is not a checkpoint",
        lambda e: ["--resume", str(e.tmp)],
        ("resume=", "not a complete checkpoint"),
    ),
]


# ---------------------------------------------------------------------------------------
# Running them.


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` with its bytes ({} if it does not exist)."""
    if not directory.is_dir():
        return {}
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def error_message(stderr: str) -> str:
    """The one error message: from its ``error:`` line to the end."""
    starts = [
        i for i, line in enumerate(stderr.splitlines()) if line.startswith("error:")
    ]
    assert len(starts) == 1, stderr[-3000:]
    return "\n".join(stderr.splitlines()[starts[0] :])


def run_args(env: Env, data: Path, extra: list[str]) -> list[str]:
    return tiny_args(
        env.model,
        data,
        env.out,
        "--epochs",
        "1",
        "--max_steps",
        "2",
        "--checkpoint_every",
        "1",
        *extra,
    )


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model_dir, tiny_data_dir) -> Path:
    """A finished two-step run of the tiny model, with its checkpoints."""
    out = tmp_path_factory.mktemp("finished") / "run"
    env = Env(tiny_model_dir, out.parent, out)
    result = run_module(run_args(env, tiny_data_dir, []))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture(autouse=True)
def restored_environment():
    # An in-process DeepSpeed run sets RANK, MASTER_PORT... for its process group;
    # later tests, and the subprocesses they start, must not inherit them.
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def run_case(case: Case, env: Env, data: Path, capsys) -> tuple[int, str, list[str]]:
    extra = case.build(env)
    args = run_args(env, data, extra)
    before = snapshot(env.out)
    if case.cli:
        result = run_module(args, timeout=300)
        code, stderr = result.returncode, result.stderr
    else:
        code = run_cli(train_main, args)
        stderr = capsys.readouterr().err
    # Nothing written, nothing lost: the run directory is byte for byte as before.
    assert snapshot(env.out) == before
    return code, stderr, args


def case_params() -> list:
    return [
        pytest.param(
            case,
            id=case.id,
            marks=[pytest.mark.slow] if case.cli or case.needs_run else [],
        )
        for case in CASES
    ]


@pytest.mark.parametrize("case", case_params())
def test_bad_input(case, request, tmp_path, tiny_model_dir, tiny_data_dir, capsys):
    env = Env(tiny_model_dir, tmp_path, tmp_path / "out")
    if case.needs_run:
        shutil.copytree(request.getfixturevalue("finished_run"), env.out)
    code, stderr, _ = run_case(case, env, tiny_data_dir, capsys)
    assert code == EXIT_USER_ERROR, stderr[-3000:]
    assert "Traceback" not in stderr
    message = error_message(stderr)
    assert "Fix:" in message
    for fragment in case.expect:
        assert fragment in message, f"{fragment!r} not in: {message}"
    assert not (env.out / "model").is_dir() or case.needs_run
    assert not (tmp_path / "REMOTE_CODE_RAN").exists()


def test_debug_flag_shows_the_traceback(
    tmp_path, tiny_model_dir, tiny_data_dir, capsys
):
    env = Env(tiny_model_dir, tmp_path, tmp_path / "out")
    code = run_cli(
        train_main, run_args(env, tiny_data_dir, ["--epochs", "0", "--debug"])
    )
    stderr = capsys.readouterr().err
    assert code == EXIT_USER_ERROR
    assert "Traceback" in stderr and "ConfigError" in stderr
    assert "error: epochs=0" in stderr


def test_the_documented_table_lists_every_case():
    doc = (REPO / "docs" / "bad-input.md").read_text()
    missing = [c.id for c in CASES if f"test_bad_input[{c.id}]" not in doc]
    assert not missing


# ---------------------------------------------------------------------------------------
# Policies: what is accepted, and how.


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_numeric_and_string_labels_are_one_class(tmp_path, tokenizer):
    # Labels are compared as text: 1 (train, a number), "1" (validation, a string) and
    # 1.0 (test, a float) are the one class "1".
    rows = make_rows(12, 1)
    for i, row in enumerate(rows):
        row["n"] = i % 2
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "validation.jsonl", [{**r, "n": str(r["n"])} for r in rows])
    write_jsonl(tmp_path / "test.jsonl", [{**r, "n": float(r["n"])} for r in rows])
    cfg = Config(tasks=[TaskConfig("n")], data=DataConfig(dataset=str(tmp_path)))
    raw = load_raw(cfg.data)
    assert raw["train"].features["n"].dtype == "int64"
    assert raw["validation"].features["n"].dtype == "string"
    assert raw["test"].features["n"].dtype == "float64"
    maps = build_label_maps(raw["train"], cfg.tasks)
    assert maps == {"n": ["0", "1"]}
    data = tokenize(raw, tokenizer, cfg, maps)
    ids = {split: list(ds["label_0"]) for split, ds in data.splits.items()}
    assert (
        ids["train"] == ids["validation"] == ids["test"] == [i % 2 for i in range(12)]
    )


def test_numbers_and_strings_mixed_in_one_column(tmp_path, tokenizer):
    # One file whose label column holds both (datasets reads it as a Json column).
    rows = make_rows(6, 1)
    for i, row in enumerate(rows):
        row["n"] = [1, "1", 2.0, "2", None, 1][i]
    write_jsonl(tmp_path / "train.jsonl", rows)
    cfg = Config(tasks=[TaskConfig("n")], data=DataConfig(dataset=str(tmp_path)))
    raw = load_raw(cfg.data)
    maps = build_label_maps(raw["train"], cfg.tasks)
    assert maps == {"n": ["1", "2"]}
    data = tokenize(raw, tokenizer, cfg, maps)
    assert list(data.splits["train"]["label_0"]) == [0, 0, 1, 1, -100, 0]


def test_an_unseen_label_is_accepted_once_listed(tmp_path, tokenizer):
    # The policy the user chooses: list the label in tasks[].labels (a class with no
    # train rows) instead of fixing the data.
    write_jsonl(tmp_path / "train.jsonl", make_rows(12, 1))
    write_jsonl(tmp_path / "validation.jsonl", with_rows(3, r2={"topic": "music"}))
    labels = ["food", "music", "sport", "tech"]
    cfg = Config(
        tasks=[TaskConfig("topic", labels=labels)],
        data=DataConfig(dataset=str(tmp_path)),
    )
    raw = load_raw(cfg.data)
    data = tokenize(raw, tokenizer, cfg, build_label_maps(raw["train"], cfg.tasks))
    assert data.splits["validation"]["label_0"][1] == labels.index("music")


@pytest.mark.slow
def test_long_text_is_truncated_counted_and_warned_once(
    tmp_path, tiny_model_dir, capsys
):
    env = Env(tiny_model_dir, tmp_path, tmp_path / "out")
    long = " ".join(["wonderful"] * 200)
    extra = dataset(
        env,
        train=with_rows(r2={"text": long}, r5={"text": long}),
        validation=with_rows(8, r1={"text": long}),
    )
    code = run_cli(train_main, run_args(env, Path(extra[1]), extra))
    stderr = capsys.readouterr().err
    assert code == 0, stderr[-3000:]
    warnings = [line for line in stderr.splitlines() if "were truncated" in line]
    assert len(warnings) == 2, warnings
    assert "2 of 24 train rows are longer than data.max_length=32" in warnings[0]
    assert "1 of 8 validation rows" in warnings[1]
    assert (env.out / "model").is_dir()


def test_more_ranks_than_rows_is_refused_by_the_batch_plan():
    # 4 ranks cannot share a global batch of 2, nor can 96 rows fill a batch of 128.
    with pytest.raises(ConfigError, match="micro_batch_size x world_size = 1 x 4"):
        plan_batches(Config(global_batch_size=2), world_size=4)
    cfg = Config(global_batch_size=128)
    with pytest.raises(ConfigError, match="larger than the train split"):
        Trainer.planned_steps(cfg, 96, plan_batches(cfg, world_size=4))


def test_a_validation_split_smaller_than_the_world_is_evaluated_once():
    # 1 row on 4 ranks: rank 0 evaluates it, the others run filler batches, so every
    # rank makes the same forward calls and the row is counted once.
    batches = [eval_batches([7], rank, 4, 16) for rank in range(4)]
    assert batches[0] == [([0], True)]
    assert all(b == [([0], False)] for b in batches[1:])


# ---------------------------------------------------------------------------------------
# Several processes: what torchrun adds.


def torchrun_summary_exit_codes(stderr: str) -> list[str]:
    """The ``exitcode : N`` of each worker in torchrun's failure summary."""
    return re.findall(r"^\s+exitcode\s+:\s+(-?\d+)", stderr, re.M)


@pytest.mark.slow
@pytest.mark.distributed
def test_more_ranks_than_the_global_batch_under_torchrun(
    tmp_path, tiny_model_dir, tiny_data_dir
):
    out = tmp_path / "out"
    env = Env(tiny_model_dir, tmp_path, out)
    result = run_module(
        run_args(env, tiny_data_dir, ["--global_batch_size", "1"]), nproc=2, timeout=300
    )
    # Every worker exits with 2 and says why; torchrun itself exits with 1 and prints
    # its own summary (a traceback of the launcher, not of mtl_dist).
    assert result.returncode == 1
    # The first worker to fail exits with 2; torchrun may stop the other with SIGTERM
    # before it gets that far.
    codes = torchrun_summary_exit_codes(result.stderr)
    assert "2" in codes and set(codes) <= {"2", "-15"}, result.stderr[-3000:]
    assert (
        "error: global_batch_size=1: does not split evenly over ranks and micro-steps"
        in result.stderr
    )
    assert "mtl_dist/" not in "".join(
        line for line in result.stderr.splitlines() if line.startswith("  File ")
    )
    assert snapshot(out) == {}


@pytest.mark.slow
@pytest.mark.distributed
def test_a_rendezvous_port_in_use_under_torchrun(
    tmp_path, tiny_model_dir, tiny_data_dir
):
    # torchrun's agent opens the port before any worker starts: the message is
    # torchrun's own, and no worker (and so nothing of mtl_dist) ever runs.
    out = tmp_path / "out"
    env = Env(tiny_model_dir, tmp_path, out)
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        result = run_module(
            run_args(env, tiny_data_dir, []),
            nproc=2,
            timeout=120,
            torchrun_args=("--master_port", str(port)),
        )
    assert result.returncode == 1
    assert "EADDRINUSE" in result.stderr and f"port: {port}" in result.stderr
    assert not out.exists()


@pytest.mark.slow
def test_master_port_in_use_for_one_deepspeed_process(
    tmp_path, tiny_model_dir, tiny_data_dir
):
    # One DeepSpeed process opens the rendezvous store itself, on MASTER_PORT.
    pytest.importorskip("deepspeed")
    out = tmp_path / "out"
    env = Env(tiny_model_dir, tmp_path, out)
    zero = str(REPO / "ds_configs" / "zero0.json")
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        result = run_module(
            run_args(env, tiny_data_dir, ["--deepspeed", zero, "--precision", "fp32"]),
            timeout=300,
            env={"MASTER_PORT": str(port), "MASTER_ADDR": "127.0.0.1"},
        )
    assert result.returncode == EXIT_USER_ERROR, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    message = error_message(result.stderr)
    assert f"MASTER_PORT='{port}': already in use on 127.0.0.1" in message
    assert "--master_port" in message
    assert snapshot(out) == {}

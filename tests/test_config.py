"""Configuration: loading, overrides, --help, and one clear error per mistake."""

from __future__ import annotations

import dataclasses

import pytest

from mtl_dist.config import (
    Config,
    DataConfig,
    ModelConfig,
    TaskConfig,
    build_arg_parser,
    config_from_dict,
    field_docs,
    parse_config,
)
from mtl_dist.errors import ConfigError
from tests.conftest import run_module, tiny_args


def test_defaults_are_the_embedded_run():
    cfg = Config()
    assert [t.name for t in cfg.tasks] == ["domain", "sentiment"]
    assert cfg.data.dataset == "builtin:uci_sentences"
    assert cfg.model.name_or_path == "sentence-transformers/all-MiniLM-L6-v2"


def test_every_field_has_a_docstring_and_a_flag():
    help_text = build_arg_parser().format_help()
    for cls, prefix in ((Config, ""), (DataConfig, "data."), (ModelConfig, "model.")):
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            assert docs.get(f.name), f"{cls.__name__}.{f.name} has no docstring"
            if f.name not in ("data", "model"):
                assert f"--{prefix}{f.name}" in help_text
    for required in ("--output_dir", "--epochs", "--max_steps", "--seed"):
        assert required in help_text
    assert "(default: 32)" in help_text  # defaults are shown


def test_yaml_then_flags(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "epochs: 5\nlr: 3.0e-5\nmodel:\n  pooling: cls\ntasks:\n"
        "  - {name: a, label_column: x, weight: 2}\n  - {name: b}\n"
        "weighting: {method: static}\n"
    )
    cfg, _ = parse_config(
        [
            "--config",
            str(path),
            "--epochs",
            "7",
            "--data.max_length",
            "64",
            "--model.freeze_encoder",
            "true",
        ]
    )
    assert cfg.epochs == 7 and cfg.lr == 3e-5 and cfg.model.pooling == "cls"
    assert cfg.data.max_length == 64 and cfg.model.freeze_encoder is True
    assert cfg.weighting.method == "static"
    assert [(t.name, t.label_column, t.weight) for t in cfg.tasks] == [
        ("a", "x", 2.0),
        ("b", "b", 1.0),
    ]


def test_tasks_shorthand_and_json_on_the_command_line():
    cfg, _ = parse_config(["--tasks", "act,emo:emotion,topic"])
    assert [(t.name, t.label_column) for t in cfg.tasks] == [
        ("act", "act"),
        ("emo", "emotion"),
        ("topic", "topic"),
    ]
    cfg, _ = parse_config(["--tasks", '[{"name": "a", "labels": ["x", "y"]}]'])
    assert cfg.tasks[0].labels == ["x", "y"]


@pytest.mark.parametrize(
    "values,key",
    [
        ({"global_batch_size": 0}, "global_batch_size"),
        ({"global_batch_size": -4}, "global_batch_size"),
        ({"epochs": 0}, "epochs"),
        ({"lr": 5}, "lr"),
        ({"precision": "fp8"}, "precision"),
        ({"tasks": []}, "tasks"),
        ({"tasks": [{"name": "a"}, {"name": "a"}]}, "tasks"),
        ({"data": {"train_file": "x.xlsx"}}, "data.train_file"),
        ({"model": {"pooling": "max"}}, "model.pooling"),
        ({"data": {"length_group_size": 0}}, "data.length_group_size"),
        ({"learning_rate": 1e-4}, "learning_rate"),
        ({"deepspeed": "no/such.json"}, "deepspeed"),
        ({"nonfinite_loss": "ignore"}, "nonfinite_loss"),
        ({"time_limit_minutes": -1}, "time_limit_minutes"),
    ],
)
def test_bad_values_name_key_and_fix(values, key):
    with pytest.raises(ConfigError) as err:
        config_from_dict(values)
    message = str(err.value)
    assert key in message and "Fix:" in message


def test_unknown_key_suggests_the_close_one():
    with pytest.raises(ConfigError, match="did you mean 'max_steps'"):
        config_from_dict({"max_step": 3})


def test_task_weight_must_not_be_negative():
    with pytest.raises(ConfigError, match="tasks.a.weight"):
        TaskConfig("a", weight=-1)


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra,key",
    [
        (["--precision", "fp16"], "precision"),
        (["--data.text_column", "sentence"], "data.text_column"),
        (["--tasks", "topic,nope"], "label_column"),
        (["--global_batch_size", "0"], "global_batch_size"),
        (["--global_batch_size", "1000"], "global_batch_size"),
    ],
)
def test_cli_user_mistakes_exit_2_without_traceback(
    extra, key, tmp_path, tiny_model_dir, tiny_data_dir
):
    result = run_module(
        tiny_args(tiny_model_dir, tiny_data_dir, tmp_path / "run") + extra
    )
    assert result.returncode == 2, result.stderr
    assert key in result.stderr and "Fix:" in result.stderr
    assert "Traceback" not in result.stderr

"""`compile`: when `auto` compiles, and that a compiled encoder trains like the eager one
and evaluates without compiling again."""

from __future__ import annotations

import pytest
import torch

from mtl_dist.config import Config, config_from_dict
from mtl_dist.distributed import init_world
from mtl_dist.engine import build_engine, compile_decision
from mtl_dist.errors import ConfigError
from mtl_dist.model import build_model
from tests.conftest import tiny_args

CPU = torch.device("cpu")


def config(**values) -> Config:
    return config_from_dict({"data": {"dataset": "builtin:uci_sentences"}, **values})


def test_auto_compiles_long_runs_only():
    cfg = config()  # auto, compile_min_steps 2000
    assert cfg.compile == "auto"
    on, reason = compile_decision(cfg, CPU, 1999)
    assert not on and "1999 planned steps < compile_min_steps 2000" in reason
    on, reason = compile_decision(cfg, CPU, 2000)
    assert on and reason.startswith("on (auto: 2000 planned steps")


def test_explicit_values_win_over_the_step_count():
    assert compile_decision(config(compile="false"), CPU, 10**6) == (False, "off")
    assert compile_decision(config(compile="true"), CPU, 1)[0]
    # YAML's `compile: true` arrives as a bool.
    assert config(compile=True).compile == "true"


def test_auto_leaves_deepspeed_eager(tmp_path):
    ds = tmp_path / "zero2.json"
    ds.write_text("{}")
    on, reason = compile_decision(config(deepspeed=str(ds)), CPU, 10**6)
    assert not on and "DeepSpeed" in reason


def test_missing_compiler_turns_auto_off_and_refuses_true(monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    on, reason = compile_decision(config(), CPU, 10**6)
    assert not on and "no-such-compiler-here" in reason
    with pytest.raises(ConfigError, match="no-such-compiler-here"):
        compile_decision(config(compile="true"), CPU, 1)


def test_compile_true_without_compiler_is_refused_before_writing(
    monkeypatch, tmp_path, tiny_model_dir, tiny_data_dir, capsys
):
    from mtl_dist.run import run_cli
    from mtl_dist.train import main

    monkeypatch.setenv("CXX", "no-such-compiler-here")
    out = tmp_path / "out"
    code = run_cli(
        main, tiny_args(tiny_model_dir, tiny_data_dir, out, "--compile", "true")
    )
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    assert "error: compile='true': torch.compile on cpu needs a C++ compiler" in err
    assert "Fix: install a C++ compiler (no-such-compiler-here)" in err
    assert not out.exists()  # refused before the run directory was made


def test_bad_value_is_refused():
    with pytest.raises(ConfigError, match="compile"):
        config(compile="sometimes")
    with pytest.raises(ConfigError, match="compile_min_steps"):
        config(compile_min_steps=-1)


@pytest.mark.slow
def test_compiled_encoder_trains_like_eager_and_evaluates_eagerly(
    tiny_model_dir, monkeypatch, tmp_path
):
    from torch._dynamo.utils import counters

    # A cache of its own: the first step compiles here, whatever ran before.
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch._dynamo.reset()
    labels = {"topic": ["a", "b", "c"], "mood": ["neg", "pos"]}
    cfg = config(
        # With dropout: on the CPU the compiled encoder draws its masks from ATen, so
        # from the same seed it drops what the eager one drops.
        model={"name_or_path": str(tiny_model_dir), "random_init": True},
        compile="auto",
        compile_min_steps=10,
        precision="bf16",
    )
    world = init_world("cpu")
    torch.manual_seed(0)
    eager = build_model(cfg.model, labels)
    compiled = build_model(cfg.model, labels)
    compiled.load_state_dict(eager.state_dict())
    engine = build_engine(compiled, cfg, world, 8, 1, 10, 1)
    assert engine.compiled and "auto: 10 planned steps" in engine.compile_reason

    generator = torch.Generator().manual_seed(1)
    for length in (7, 12):  # two lengths: one graph for both (dynamic shapes)
        ids = torch.randint(1000, 2000, (8, length), generator=generator)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        eager.load_state_dict(engine.module.state_dict())  # the weights of this step
        torch.manual_seed(length)
        out = engine.forward(batch)
        torch.manual_seed(length)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            reference = eager(**batch)
        for task in labels:
            torch.testing.assert_close(
                out[task].float(), reference[task].float(), atol=0.05, rtol=0.05
            )
        loss = sum(out[task].float().logsumexp(-1).mean() for task in labels)
        engine.backward(loss)
        engine.step()
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1, "the encoder did not run compiled"

    with engine.eval_mode():
        out = engine.module(**batch)
    assert counters["stats"]["unique_graphs"] == graphs, "evaluation compiled again"
    # Eager evaluation of the same weights: the plain module's own forward.
    eager.load_state_dict(engine.module.state_dict())
    eager.eval()
    with torch.inference_mode():
        reference = eager(**batch)
    for task in labels:
        torch.testing.assert_close(out[task], reference[task])
    torch._dynamo.reset()

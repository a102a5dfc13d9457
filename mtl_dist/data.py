"""Data: load splits, build label maps, tokenise (cached), shard and batch.

The train order is a property of the global batch, never of the world size: one permutation
per epoch from the seed, cut into global batches, and each global batch cut into
``world_size x accumulation`` micro-batches. Any world size therefore sees the same global
batches in the same order, which is what makes 1, 2 or 8 processes train the same model.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import json
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from datasets.fingerprint import Hasher

from mtl_dist.config import DATA_EXTENSIONS, Config, DataConfig, TaskConfig
from mtl_dist.errors import ConfigError, hub_offline
from mtl_dist.host_memory import release_freed_memory

SPLITS = ("train", "validation", "test")
IGNORE_INDEX = -100
"""Class id of a missing label; cross-entropy skips it."""
BUILTIN_PREFIX = "builtin:"
DEFAULT_DATASET = DataConfig.dataset
SOURCE_COLUMN = "source"
"""Where a row came from, in data with per-task files: 0 the shared data set, 1 + i
the own files of task i. The task sampler draws one source per step."""
CONTEXT_COLUMN = "context"
"""The preceding utterances of a row's conversation, most recent first
(``data.context_turns``); encoded as the second text segment."""


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
    """Local split files named by the config; empty when ``dataset`` is a hub name.

    Split files given one by one replace the built-in default data set entirely: a
    train file of one's own must not be validated on the built-in sentences.
    """
    files: dict[str, str] = {}
    explicit = any(getattr(cfg, f"{split}_file") for split in SPLITS)
    if cfg.dataset is None or (explicit and cfg.dataset == DEFAULT_DATASET):
        pass
    elif cfg.dataset.startswith(BUILTIN_PREFIX):
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


TEXT_FORMATS = (".jsonl", ".json", ".csv", ".tsv")
"""Extensions read as UTF-8 text (Parquet stores its strings in its own encoding)."""
SHOWN_ROWS = 5
"""How many offending rows an error message lists."""
JSON_FIX = (
    "write one JSON object per line (or, in a .json file, a list of objects) and "
    "correct or remove the line named"
)


def _load_local(files: dict[str, str], key: str = "data") -> datasets.DatasetDict:
    """Read split files; ``key`` names the config section in error messages."""
    loaded = {}
    for split, path in files.items():
        option = f"{key}.{split}_file"
        ext = Path(path).suffix.lower()
        digest = _scan_file(path, option)
        if ext in (".jsonl", ".json"):
            _check_json_lines(option, path)
        kwargs: dict[str, Any] = {"delimiter": "\t"} if ext == ".tsv" else {}
        # datasets logs its own account of a malformed file before raising; the
        # error below says it with the line, once.
        verbosity = datasets.utils.logging.get_verbosity()
        datasets.utils.logging.set_verbosity(datasets.utils.logging.CRITICAL)
        try:
            # The digest in the config name makes the cache follow the file's bytes.
            ds = datasets.load_dataset(
                DATA_EXTENSIONS[ext],
                name=f"mtl-{digest}",
                data_files={split: path},
                split=split,
                **kwargs,
            )
        except Exception as exc:  # datasets raises many types for malformed files
            raise _unreadable(option, path, exc) from None
        finally:
            datasets.utils.logging.set_verbosity(verbosity)
        if ext in (".csv", ".tsv") and "__index_level_0__" in ds.column_names:
            raise _ragged_csv(option, path)
        loaded[split] = ds
    return datasets.DatasetDict(loaded)


def _scan_file(path: str, option: str) -> str:
    """Check a local data file before ``datasets`` reads it; returns a digest of its
    bytes.

    pyarrow stores invalid UTF-8 without complaint and fails only when a row is read,
    far from the file; here the file and line can still be named. The digest keys
    ``datasets``' cache, which fingerprints a local file by path and mtime only: a file
    rewritten with its mtime kept (``cp -p``, ``rsync -t``, a coarse clock) would
    otherwise be read from the stale cache.
    """
    p = Path(path)
    if p.is_dir():
        raise ConfigError(
            option, path, "give the path of a file, not a directory", "is a directory"
        )
    text = p.suffix.lower() in TEXT_FORMATS
    digest = hashlib.blake2b(digest_size=12)
    decoder = codecs.getincrementaldecoder("utf-8")()
    blank, utf8 = True, True
    with p.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
            blank = blank and not chunk.strip()
            if text and utf8:
                try:
                    decoder.decode(chunk)
                except UnicodeDecodeError:
                    utf8 = False
    if blank:
        raise ConfigError(
            option, path, "give a file with at least one row", "the file is empty"
        )
    if text and utf8:
        try:
            decoder.decode(b"", final=True)  # a sequence cut off at the end
        except UnicodeDecodeError:
            utf8 = False
    if not utf8:
        raise _utf8_error(option, path)
    return digest.hexdigest()


def _utf8_error(option: str, path: str) -> ConfigError:
    """Where a file stops being UTF-8: line, column and byte offset."""
    offset = 0
    with open(path, "rb") as fh:
        # A newline byte never occurs inside a UTF-8 sequence: lines decode alone.
        for number, line in enumerate(fh, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as exc:
                return ConfigError(
                    option,
                    path,
                    "save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)",
                    f"not UTF-8: byte 0x{line[exc.start]:02x} at line {number}, "
                    f"column {exc.start + 1} (byte offset {offset + exc.start})",
                )
            offset += len(line)
    return ConfigError(option, path, "save the file as UTF-8", "not UTF-8 at the end")


def _json_kind(value: Any) -> str:
    kinds = {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}
    if value is None:
        return "null"
    return kinds.get(type(value), "a number")


def _json_problem(path: str) -> str | None:
    """What is wrong in a JSON Lines (or JSON) file, with its line; None if nothing
    is wrong line by line."""
    with open(path, encoding="utf-8") as fh:
        content = fh.read()
    if Path(path).suffix.lower() == ".json" and content.lstrip()[:1] != "{":
        # A whole JSON document: a list of objects.
        try:
            value = json.loads(content)
        except json.JSONDecodeError as exc:
            return f"line {exc.lineno}, column {exc.colno}: {exc.msg}"
        if not isinstance(value, list):
            return f"the document is {_json_kind(value)}, not a list of objects"
        for i, item in enumerate(value):
            if not isinstance(item, dict):
                return f"item {i + 1} of the list is {_json_kind(item)}, not an object"
        return None
    for number, line in enumerate(content.split("\n"), 1):
        problem = _line_problem(number, line) if line.strip() else None
        if problem is not None:
            return problem
    return None


def _line_problem(number: int, line: str) -> str | None:
    """Why a line of a JSON Lines file is not a JSON object (None: it is one)."""
    try:
        value = json.loads(line)
    except json.JSONDecodeError as exc:
        return f"line {number}, column {exc.colno}: {exc.msg}"
    if not isinstance(value, dict):
        return f"line {number} holds {_json_kind(value)}, not an object"
    return None


def _check_json_lines(option: str, path: str) -> None:
    """Refuse a line that cannot start a JSON object before pyarrow reads the file:
    pyarrow's JSON reader (26.0) kills the process with a segfault when the first line
    is ``null``. Lines are only glanced at here; pyarrow parses them."""
    document = Path(path).suffix.lower() == ".json"
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            head = line.lstrip()[:1]
            if not head:
                continue
            if head != "{" and not (document and head == "["):
                problem = _line_problem(number, line) or f"line {number}"
                raise ConfigError(option, path, JSON_FIX, f"not valid JSON: {problem}")
            if document:
                return  # one document: a list, or an object over several lines


def _root_cause(exc: BaseException) -> str:
    """The innermost error behind ``exc`` that says something, as one line."""
    best = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    seen = {id(exc)}
    cause = exc.__cause__
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if str(cause):
            best = f"{type(cause).__name__}: {cause}"
        cause = cause.__cause__
    return best.splitlines()[0][:300]


def _unreadable(option: str, path: str, exc: Exception) -> ConfigError:
    """The clearest account of why ``datasets`` could not read a local file."""
    ext = Path(path).suffix.lower()
    if "corresponds to no data" in str(exc):
        return ConfigError(
            option,
            path,
            "give a file with at least one row",
            "the file has no rows" + (" (only a header?)" if ext != ".jsonl" else ""),
        )
    if ext in (".csv", ".tsv") and "fields in line" in _root_cause(exc):
        return _ragged_csv(option, path)  # pandas counts lines from 1, with the header
    if ext in (".jsonl", ".json"):
        problem = _json_problem(path)
        if problem is not None:
            return ConfigError(option, path, JSON_FIX, f"not valid JSON: {problem}")
    return ConfigError(
        option,
        path,
        f"check that the file is valid {DATA_EXTENSIONS[ext].upper()}",
        f"cannot be read ({_root_cause(exc)})",
    )


def _delimiter(path: str) -> str:
    return "\t" if str(path).lower().endswith(".tsv") else ","


def _ragged_csv(option: str, path: str) -> ConfigError:
    """pandas turns the extra fields of long rows into an index: name the first one."""
    sep = _delimiter(path)
    with open(path, encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh, delimiter=sep)
        header = next(reader, [])
        for row in reader:
            if len(row) > len(header):
                return ConfigError(
                    option,
                    path,
                    f"give line {reader.line_num} {len(header)} fields, as the "
                    f"header has, or quote values that hold the delimiter {sep!r}",
                    f"line {reader.line_num} has {len(row)} fields, the header "
                    f"{len(header)}",
                )
    return ConfigError(
        option, path, "give every row as many fields as the header", "ragged rows"
    )


def _file_lines(where: str, rows: Sequence[int]) -> list[int] | None:
    """The line numbers of data rows (0-based) in a local file, None when the file
    has no line per row (Parquet, a JSON document, a hub data set)."""
    path = Path(where)
    ext = path.suffix.lower()
    if ext not in TEXT_FORMATS or not path.is_file():
        return None
    wanted, found = set(rows), {}
    with path.open(encoding="utf-8", newline="") as fh:
        if ext in (".csv", ".tsv"):
            # Records, not lines: a quoted field may span lines; blank lines are
            # skipped by pandas as here.
            reader = csv.reader(fh, delimiter=_delimiter(where))
            next(reader, None)
            row, start = 0, reader.line_num + 1
            for record in reader:
                if record:
                    if row in wanted:
                        found[row] = start
                    row += 1
                start = reader.line_num + 1
        else:
            head = fh.read(1 << 16).lstrip()[:1]
            if ext == ".json" and head == "[":
                return None
            fh.seek(0)
            row = 0
            for number, line in enumerate(fh, 1):
                if line.strip():
                    if row in wanted:
                        found[row] = number
                    row += 1
    return [found[r] for r in rows] if len(found) == len(wanted) else None


def _rows_text(where: str, rows: Sequence[int]) -> str:
    """'lines 3, 9 and 4 more of FILE' (or 'rows ...' where lines mean nothing)."""
    shown = list(rows[:SHOWN_ROWS])
    more = f" and {len(rows) - len(shown)} more" if len(rows) > len(shown) else ""
    lines = _file_lines(where, shown)
    noun, numbers = ("line", lines) if lines else ("row", [r + 1 for r in shown])
    plural = "s" if len(rows) > 1 else ""
    return f"{noun}{plural} {', '.join(map(str, numbers))}{more} of {where}"


def load_raw(cfg: DataConfig, tasks: Sequence[TaskConfig] = ()) -> datasets.DatasetDict:
    """The raw splits as a ``DatasetDict`` (train required, validation/test optional).

    Tasks with their own files (``tasks[].train_file``...) add their rows to the shared
    data set's, unlabelled for every other task, with a ``source`` column saying where
    each row came from. With ``data.context_turns``, every row also gets its
    conversation's preceding utterances (``context``), taken within its own source.
    """
    sources: list[tuple[int, datasets.DatasetDict]] = []
    if cfg.dataset is not None or resolve_data_files(cfg):
        sources.append((0, _with_context(_load_shared(cfg), cfg)))
    for i, task in enumerate(tasks):
        own = _load_task_files(cfg, task)
        if own is not None:
            sources.append((1 + i, _with_context(own, cfg)))
    if len(sources) == 1 and sources[0][0] == 0:
        return sources[0][1]  # the common case: nothing to merge
    return _merge_sources(sources, cfg, tasks)


def _load_shared(cfg: DataConfig) -> datasets.DatasetDict:
    files = resolve_data_files(cfg)
    if files:
        raw = _load_local(files)
    else:
        try:
            raw = datasets.load_dataset(cfg.dataset, cfg.dataset_config)
        except Exception as exc:
            offline = hub_offline() or "connect" in str(exc).lower()
            hint = (
                " (the hub is not reachable or HF_DATASETS_OFFLINE / HF_HUB_OFFLINE "
                "is set: use local files)"
                if offline
                else ""
            )
            raise ConfigError(
                "data.dataset",
                cfg.dataset,
                "give a local directory, split files or a reachable hub "
                f"data set{hint}",
                f"cannot be loaded ({_root_cause(exc)})",
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
    keys = ["text_column", "text_pair_column"]
    if cfg.context_turns:
        keys += ["context_group_column", "context_order_column"]
    for key in keys:
        column = getattr(cfg, key)
        if column is not None and column not in ds.column_names:
            raise _missing_column(f"data.{key}", column, ds, split, where)
    _check_text(ds, "data.text_column", cfg.text_column, split, where)
    if cfg.text_pair_column is not None:
        # A missing second segment is allowed: the row is encoded as a single text.
        _check_text(
            ds, "data.text_pair_column", cfg.text_pair_column, split, where, False
        )


def _missing_column(
    option: str, column: str, ds: datasets.Dataset, split: str, where: str
) -> ConfigError:
    names = ds.column_names
    if len(names) == 1 and str(where).lower().endswith((".csv", ".tsv")):
        # One column whose name holds another delimiter: the header was not split.
        used = [sep for sep in (",", ";", "\t", "|") if sep in names[0]]
        if used:
            return ConfigError(
                option,
                column,
                "write the file comma-separated as .csv or tab-separated as .tsv",
                f"{where} was read as one column {names[0]!r}: it is separated by "
                f"{used[0]!r}, not by {_delimiter(where)!r}",
            )
    return ConfigError(
        option,
        column,
        f"set {option} to one of {names}",
        f"no such column in the {split} split ({where})",
    )


def _check_text(
    ds: datasets.Dataset,
    option: str,
    column: str,
    split: str,
    where: str,
    required: bool = True,
) -> None:
    """Refuse text that is not a string, and (``required``) empty text: a model fed
    an empty sentence learns its labels from nothing."""
    feature = ds.features[column]
    if isinstance(feature, datasets.Value) and feature.dtype in (
        "string",
        "large_string",
    ):
        if not required:
            return
        # In slices: Arrow's memory pool keeps what a compute kernel allocated, and a
        # whole-column trim would leave the process larger by the column's size.
        found, offset = [], 0
        for batch in ds.with_format("arrow").iter(batch_size=65536):
            values = batch[column]
            empty = pc.or_kleene(
                pc.is_null(values), pc.equal(pc.utf8_trim_whitespace(values), "")
            )
            found.append(np.flatnonzero(empty.to_numpy(zero_copy_only=False)) + offset)
            offset += len(values)
        rows = np.concatenate(found) if found else np.zeros(0, dtype=np.int64)
        pa.default_memory_pool().release_unused()
        others: list[int] = []
    else:
        # Mixed types (datasets' Json feature), numbers, lists, objects.
        values = list(ds[column])
        others, blank = [], []
        for i, value in enumerate(values):
            if value is None or (isinstance(value, str) and not value.strip()):
                blank.append(i)
            elif not isinstance(value, str):
                others.append(i)
        rows = np.asarray(blank if required else [], dtype=np.int64)
    if others:
        first = values[others[0]]
        raise ConfigError(
            option,
            column,
            "make every value of the column a string (quote numbers in JSON)",
            f"not text at {_rows_text(where, others)} ({_json_kind(first)}: "
            f"{str(first)[:40]!r}), in the {split} split",
        )
    if len(rows):
        raise ConfigError(
            option,
            column,
            "fill in or remove those rows",
            f"empty or whitespace-only text at {_rows_text(where, rows.tolist())}, "
            f"in the {split} split",
        )


def _load_task_files(cfg: DataConfig, task: TaskConfig) -> datasets.DatasetDict | None:
    """A task's own split files (None when it has none)."""
    key = f"tasks.{task.name}"
    files = {}
    for split in SPLITS:
        path = getattr(task, f"{split}_file")
        if path is None:
            continue
        if not Path(path).is_file():
            raise ConfigError(
                f"{key}.{split}_file",
                path,
                "give the path of an existing file",
                "file not found",
            )
        files[split] = path
    if not files:
        return None
    if "train" not in files:
        raise ConfigError(
            f"{key}.train_file",
            None,
            "give the task's train file too",
            "a task with its own validation or test file needs its own train file",
        )
    raw = _load_local(files, key)
    for split, ds in raw.items():
        if len(ds) == 0:
            raise ConfigError(
                f"{key}.{split}_file",
                files[split],
                "give a file with at least one row",
                "the file is empty",
            )
        _check_columns(ds, cfg, split, files[split])
        if task.label_column not in ds.column_names:
            raise ConfigError(
                f"{key}.label_column",
                task.label_column,
                f"use one of {ds.column_names}",
                f"no such column in {files[split]}",
            )
    return raw


def _merge_sources(
    sources: list[tuple[int, datasets.DatasetDict]],
    cfg: DataConfig,
    tasks: Sequence[TaskConfig],
) -> datasets.DatasetDict:
    """One data set per split from several sources, in a common schema: the text
    column(s), every task's label as text (None where the source has none) and
    ``source``."""
    label_columns = list(dict.fromkeys(t.label_column for t in tasks))
    text_columns = [c for c in (cfg.text_column, cfg.text_pair_column) if c]
    features = datasets.Features(
        {
            **{c: datasets.Value("string") for c in text_columns},
            **(
                {CONTEXT_COLUMN: datasets.Sequence(datasets.Value("string"))}
                if cfg.context_turns
                else {}
            ),
            **{c: datasets.Value("string") for c in label_columns},
            SOURCE_COLUMN: datasets.Value("int32"),
        }
    )
    merged: dict[str, list[datasets.Dataset]] = {}
    for source, raw in sources:
        for split, ds in raw.items():

            def common(batch: dict[str, list], source: int = source) -> dict[str, list]:
                size = len(batch[cfg.text_column])
                out = {
                    c: [t if isinstance(t, str) else None for t in batch[c]]
                    for c in text_columns
                }
                if cfg.context_turns:
                    out[CONTEXT_COLUMN] = batch[CONTEXT_COLUMN]
                for c in label_columns:
                    values = batch.get(c, [None] * size)
                    out[c] = [_label_text(v) for v in values]
                out[SOURCE_COLUMN] = [source] * size
                return out

            merged.setdefault(split, []).append(
                ds.map(
                    common,
                    batched=True,
                    remove_columns=ds.column_names,
                    features=features,
                    new_fingerprint=Hasher.hash(
                        (ds._fingerprint, source, features.to_dict(), "merge-v1")
                    ),
                    desc=f"merging {split} (source {source})",
                )
            )
    return datasets.DatasetDict(
        {split: datasets.concatenate_datasets(parts) for split, parts in merged.items()}
    )


# ---------------------------------------------------------------------------------------
# Dialogue context: the preceding utterances of the same conversation.


def _order_key(value: Any) -> tuple[int, float | str]:
    """Numbers sort as numbers, anything else as text (numbers first)."""
    try:
        return (0, float(value))
    except (TypeError, ValueError):
        return (1, str(value))


def conversation_context(
    ds: datasets.Dataset, cfg: DataConfig, split: str
) -> list[list[str]]:
    """For each row, the texts of up to ``context_turns`` rows before it in its
    conversation, most recent first."""
    groups = ds[cfg.context_group_column]
    orders: list[Any] = (
        ds[cfg.context_order_column]
        if cfg.context_order_column is not None
        else list(range(len(ds)))
    )
    if cfg.context_id_pattern is not None:
        pattern = re.compile(cfg.context_id_pattern)
        keyed_groups, keyed_orders = [], []
        for row, value in enumerate(groups):
            match = pattern.search(str(value))
            if match is None:
                raise ConfigError(
                    "data.context_id_pattern",
                    cfg.context_id_pattern,
                    f"make it match every value of {cfg.context_group_column}",
                    f"does not match {value!r} (row {row + 1} of the {split} split)",
                )
            keyed_groups.append(match["group"])
            order = match.groupdict().get("order")
            keyed_orders.append(order if order is not None else orders[row])
        groups, orders = keyed_groups, keyed_orders
    texts = ds[cfg.text_column]
    members: dict[Any, list[int]] = {}
    for row, group in enumerate(groups):
        members.setdefault(group, []).append(row)
    context: list[list[str]] = [[] for _ in range(len(ds))]
    turns = cfg.context_turns
    for rows in members.values():
        # Ties keep file order: the sort is stable.
        rows.sort(key=lambda r: _order_key(orders[r]))
        for pos, row in enumerate(rows):
            before = rows[max(0, pos - turns) : pos]
            context[row] = [
                t if isinstance(t, str) else "" for t in (texts[r] for r in before)
            ][::-1]
    return context


def _with_context(raw: datasets.DatasetDict, cfg: DataConfig) -> datasets.DatasetDict:
    if not cfg.context_turns:
        return raw
    out = {}
    for split, ds in raw.items():
        context = conversation_context(ds, cfg, split)
        out[split] = ds.map(
            lambda batch, indices, context=context: {
                CONTEXT_COLUMN: [context[i] for i in indices]
            },
            batched=True,
            with_indices=True,
            new_fingerprint=Hasher.hash(
                (
                    ds._fingerprint,
                    cfg.text_column,
                    cfg.context_turns,
                    cfg.context_group_column,
                    cfg.context_order_column,
                    cfg.context_id_pattern,
                    "context-v1",
                )
            ),
            desc=f"adding context to {split}",
        )
    return datasets.DatasetDict(out)


# ---------------------------------------------------------------------------------------
# Labels.


def _label_text(value: Any) -> str | None:
    """A label as its vocabulary string; None for a missing label.

    Labels are compared as text, so a split read as numbers and another read as
    strings agree: 1, 1.0 and "1" are the class "1" (a float with no fraction loses
    its ".0"); the string "1.0" stays "1.0", and True is "True".
    """
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
        seen = _distinct_labels(train, task)
        if len(seen) < 2:
            raise ConfigError(
                f"tasks.{task.name}.label_column",
                task.label_column,
                "label at least two classes in the train split",
                f"found {len(seen)} distinct label(s)",
            )
        maps[task.name] = sorted(seen)
    return maps


def _distinct_labels(train: datasets.Dataset, task: TaskConfig) -> set[str]:
    column = task.label_column
    feature = train.features[column]
    if isinstance(feature, (datasets.Value, datasets.ClassLabel)):
        # Distinct values through Arrow: one Python object per class, not per row.
        values = train.unique(column)
    elif isinstance(feature, datasets.Json):
        # Numbers on some rows and strings on others: Arrow cannot take them apart.
        values = list(train[column])
    else:
        raise ConfigError(
            f"tasks.{task.name}.label_column",
            column,
            "give one label per row: a string or a number",
            f"holds {type(feature).__name__} values in the train split",
        )
    seen = set()
    for value in values:
        _check_label_value(task, value, "train")
        seen.add(_label_text(value))
    return seen - {None}


def _check_label_value(task: TaskConfig, value: Any, split: str) -> None:
    if isinstance(value, (list, dict)):
        raise ConfigError(
            f"tasks.{task.name}.label_column",
            task.label_column,
            "give one label per row: a string or a number",
            f"holds {_json_kind(value)} ({str(value)[:40]!r}) in the {split} split",
        )


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
            if task.labels is not None:
                problem = f"label in the {split} split not in tasks.{task.name}.labels"
            else:
                problem = f"label in the {split} split never seen in train"
            raise ConfigError(
                f"tasks.{task.name}.labels",
                text,
                f"list {text!r} in tasks.{task.name}.labels or fix the {split} data "
                f"(known: {classes})",
                problem,
            )
        return ids[text]

    def encode(column: list[Any]) -> list[int]:
        out = []
        for raw in column:
            _check_label_value(task, raw, split)
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
    separator = f" {tokenizer.sep_token or '|'} "

    def encode(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        texts = [t if isinstance(t, str) else "" for t in batch[cfg.text_column]]
        pairs = None
        if cfg.text_pair_column is not None:
            pairs = [
                t if isinstance(t, str) else "" for t in batch[cfg.text_pair_column]
            ]
        elif cfg.context_turns:
            pairs = [separator.join(turns) for turns in batch[CONTEXT_COLUMN]]
        # Only the token ids are stored (and segment ids for pairs): the attention mask
        # is all ones before padding, so the collator rebuilds it from the length. That
        # halves what tokenisation converts to Python and writes to disk.
        encoded = tokenizer(
            texts,
            pairs,
            truncation=True,
            max_length=cfg.max_length,
            return_attention_mask=False,
            return_token_type_ids=pairs is not None,
        )
        out = dict(encoded)
        out["length"] = [len(x) for x in out["input_ids"]]
        # A fast tokenizer keeps what truncation cut off; a slow one does not, and a
        # row that fills max_length is then counted as truncated.
        if encoded.encodings is not None:
            out["truncated"] = [bool(e.overflowing) for e in encoded.encodings]
        else:
            out["truncated"] = [n >= cfg.max_length for n in out["length"]]
        for i, task in enumerate(tasks):
            out[label_key(i)] = labels[i](batch[task.label_column])
        if SOURCE_COLUMN in batch:
            out[SOURCE_COLUMN] = batch[SOURCE_COLUMN]
        return out

    return encode


@dataclass
class TokenizedData:
    """Tokenised splits plus what is needed to batch them."""

    splits: dict[str, datasets.Dataset]
    label_maps: dict[str, list[str]]
    input_columns: list[str]
    truncated: dict[str, int] = field(default_factory=dict)
    """Rows of each split longer than ``data.max_length`` tokens, cut to it."""


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
            task = next(t for t in cfg.tasks if t.label_column == missing[0])
            raise ConfigError(
                f"tasks.{task.name}.label_column",
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
                cfg.data.context_turns,
                [(t.name, t.label_column) for t in cfg.tasks],
                label_maps,
                "v4",
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
    release_freed_memory()  # loading's and the checks' temporaries, long freed
    truncated = {
        split: int(column_array(ds, "truncated").sum()) for split, ds in splits.items()
    }
    return TokenizedData(splits, label_maps, columns, truncated)


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
        self._order = torch.empty(0, global_batch_size, dtype=torch.int32)

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
        # Row indices as int32: the order is held for the whole epoch, and its size
        # is the one part of a training process's memory that grows with the data.
        perm = torch.randperm(self.num_examples, generator=gen)[: steps * size]
        perm = perm.to(torch.int32)
        if self.lengths is None:
            return perm.view(steps, size)
        return self._longest_first(self._length_grouped(perm, gen))

    def _length_grouped(self, rows: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """``rows`` (a multiple of G, in random order) as global batches of similar
        length: each window of ``group_size`` batches sorted by length and cut, then
        the batches shuffled."""
        assert self.lengths is not None
        grouped = torch.empty_like(rows)
        window = self.group_size * self.global_batch_size
        for start in range(0, len(rows), window):
            part = rows[start : start + window]
            # Stable: ties keep the permutation's order, so every rank (and every
            # run) builds exactly the same batches.
            order = torch.sort(self.lengths[part], stable=True).indices
            grouped[start : start + len(part)] = part[order]
        batches = grouped.view(-1, self.global_batch_size)
        return batches[torch.randperm(len(batches), generator=gen)]

    def _longest_first(self, batches: torch.Tensor) -> torch.Tensor:
        """Swap the batch holding the longest row to the front: a batch too large
        for memory then fails at once, not hours in."""
        assert self.lengths is not None
        longest = int(torch.argmax(self.lengths[batches].amax(1)))
        batches[[0, longest]] = batches[[longest, 0]]
        return batches

    def state_dict(self) -> dict[str, Any]:
        """Where the sampler stands; the order itself is recomputed from the seed."""
        return {
            "epoch": self.epoch,
            "start_step": self.start_step,
            "num_examples": self.num_examples,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`; refuses a train split of another size,
        whose order would differ from the checkpointed run's."""
        if state["num_examples"] != self.num_examples:
            raise ConfigError(
                "data",
                f"{self.num_examples} train rows",
                "resume with the train data the checkpoint was written with, or "
                "start a new run",
                f"the checkpoint was written with {state['num_examples']} train rows",
            )
        self.set_epoch(state["epoch"], state["start_step"])

    def global_batch(self, step: int) -> torch.Tensor:
        """Indices of the whole global batch of ``step`` (counted within the epoch): the
        same on every rank, whatever its share."""
        if self._order_epoch != self.epoch:
            self._order = self._epoch_order()
            self._order_epoch = self.epoch
            # Building the order made whole-epoch temporaries (the int64 permutation,
            # sort indices); hand the memory they freed back to the system.
            release_freed_memory()
        return self._order[step]

    def __iter__(self) -> Iterator[list[int]]:
        size = self.micro_batch_size
        for step in range(self.start_step, self.steps_per_epoch):
            batch = self.global_batch(step)
            for micro in range(self.accumulation):
                chunk = micro * self.world_size + self.rank
                yield batch[chunk * size : (chunk + 1) * size].tolist()


class TaskBatchSampler(GlobalBatchSampler):
    """Each global batch from one source (a task's own files, or the shared data set),
    the source of each step drawn by ``method``: ``proportional`` to its rows,
    ``temperature`` (rows^(1/T)) or ``round_robin``.

    The draws of epoch ``e`` come from the seed and ``e`` alone, so every rank makes
    the same ones. Each source reads its rows as an endless stream of permutations (one
    per pass over the source, seeded by the seed, the source and the pass); a draw takes
    the next global batch from its source's stream, so a small source repeats sooner
    and no row is left out. Where each stream stands at an epoch's start follows from
    the earlier epochs' draws, which :meth:`state_dict` records so that a resumed run
    can check it continues the same streams. With ``lengths``, each source's rows of
    the epoch are length-grouped as in :class:`GlobalBatchSampler`.
    """

    def __init__(
        self,
        sources: Sequence[int] | np.ndarray,
        method: str,
        temperature: float,
        global_batch_size: int,
        micro_batch_size: int,
        world_size: int,
        rank: int,
        seed: int,
        lengths: Sequence[int] | np.ndarray | None = None,
        group_size: int = 64,
    ) -> None:
        super().__init__(
            len(sources),
            global_batch_size,
            micro_batch_size,
            world_size,
            rank,
            seed,
            lengths,
            group_size,
        )
        sources = np.asarray(sources)
        self.source_ids = [int(x) for x in np.unique(sources)]
        self.members = [
            torch.from_numpy(np.flatnonzero(sources == s).astype(np.int32))
            for s in self.source_ids
        ]
        self.sizes = np.array([len(m) for m in self.members], dtype=np.float64)
        self.method = method
        if method == "proportional":
            self.probs: np.ndarray | None = self.sizes / self.sizes.sum()
        elif method == "temperature":
            scaled = self.sizes ** (1.0 / temperature)
            self.probs = scaled / scaled.sum()
        else:
            assert method == "round_robin", method
            self.probs = None

    def draws(self, epoch: int) -> np.ndarray:
        """The source index (into ``source_ids``) of every step of ``epoch``."""
        steps, count = self.steps_per_epoch, len(self.source_ids)
        if self.probs is None:
            return (epoch * steps + np.arange(steps)) % count
        rng = np.random.default_rng([self.seed, epoch, 0x7A5C])
        return rng.choice(count, size=steps, p=self.probs)

    def consumed_before(self, epoch: int) -> list[int]:
        """Rows each source's stream gave out in the epochs before ``epoch``."""
        counts = np.zeros(len(self.source_ids), dtype=np.int64)
        for e in range(epoch):
            counts += np.bincount(self.draws(e), minlength=len(self.source_ids))
        return [int(c) * self.global_batch_size for c in counts]

    def _stream(self, source: int, start: int, count: int) -> torch.Tensor:
        """Rows ``start`` to ``start + count`` of a source's endless stream."""
        rows = self.members[source]
        size = len(rows)
        parts, position = [], start
        while position < start + count:
            cycle, offset = divmod(position, size)
            rng = np.random.default_rng([self.seed, self.source_ids[source], cycle])
            perm = torch.from_numpy(rng.permutation(size))
            take = min(size - offset, start + count - position)
            parts.append(rows[perm[offset : offset + take]])
            position += take
        return torch.cat(parts)

    def _epoch_order(self) -> torch.Tensor:
        size = self.global_batch_size
        draws = self.draws(self.epoch)
        consumed = self.consumed_before(self.epoch)
        batches = torch.empty(self.steps_per_epoch, size, dtype=torch.int32)
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        for source in range(len(self.source_ids)):
            steps = np.flatnonzero(draws == source)
            if len(steps) == 0:
                continue
            rows = self._stream(source, consumed[source], len(steps) * size)
            if self.lengths is not None:
                rows = self._length_grouped(rows, gen)
            batches[torch.from_numpy(steps)] = rows.view(len(steps), size)
        if self.lengths is None:
            return batches
        return self._longest_first(batches)

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "method": self.method,
            "source_ids": self.source_ids,
            "source_sizes": [int(x) for x in self.sizes],
            "consumed": self.consumed_before(self.epoch),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        mine = self.state_dict()
        for key in ("method", "source_ids", "source_sizes", "consumed"):
            if state.get(key) != mine[key]:
                raise ConfigError(
                    "data.task_sampling",
                    self.method,
                    "resume with the data and task sampling the checkpoint was "
                    "written with, or start a new run",
                    f"the checkpoint's sampler differs in {key}: {state.get(key)} "
                    f"there, {mine[key]} now",
                )


def train_sampler(
    train: datasets.Dataset,
    cfg: Config,
    global_batch_size: int,
    micro_batch_size: int,
    world_size: int,
    rank: int,
) -> GlobalBatchSampler:
    """The train sampler the config asks for: length-grouped or plainly shuffled, from
    all rows or one source per step."""
    lengths = (
        column_array(train, "length", np.int32) if cfg.data.group_by_length else None
    )
    common = (
        global_batch_size,
        micro_batch_size,
        world_size,
        rank,
        cfg.seed,
        lengths,
        cfg.data.length_group_size,
    )
    if cfg.data.task_sampling == "none":
        return GlobalBatchSampler(len(train), *common)
    sources = (
        column_array(train, SOURCE_COLUMN)
        if SOURCE_COLUMN in train.column_names
        else np.zeros(len(train), dtype=np.int32)
    )
    if len(np.unique(sources)) < 2:
        raise ConfigError(
            "data.task_sampling",
            cfg.data.task_sampling,
            "give tasks their own data (tasks[].train_file), or use none",
            "needs at least two sources of train rows",
        )
    return TaskBatchSampler(
        sources, cfg.data.task_sampling, cfg.data.sampling_temperature, *common
    )


def column_array(
    ds: datasets.Dataset, column: str, dtype: np.dtype | type | None = None
) -> np.ndarray:
    """One column of numbers as a numpy array (of ``dtype``, default the column's).

    Copied record batch by record batch from the memory-mapped Arrow table into the one
    array it returns: neither a Python object per row nor a whole-column temporary.
    Reading a million-row column through datasets' numpy formatter instead left about
    16 MiB in the process after the array itself was freed (allocator memory kept),
    which made a training process's memory grow with the data set.
    """
    values = ds.with_format("arrow")[column]
    if isinstance(values, pa.Array):
        values = pa.chunked_array([values], type=values.type)
    out = np.empty(len(values), dtype=dtype or values.type.to_pandas_dtype())
    start = 0
    for chunk in values.chunks:
        assert chunk.null_count == 0, f"{column} has nulls"  # written by tokenize
        # Zero-copy for numbers without nulls; booleans (bit-packed) copy one chunk.
        out[start : start + len(chunk)] = chunk.to_numpy(zero_copy_only=False)
        start += len(chunk)
    return out


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

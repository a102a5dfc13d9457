"""Property tests of the data path: whatever a file holds, loading, labelling and
tokenising it either works or raises ConfigError (a message for the user), never
another exception."""

from __future__ import annotations

import csv
import io
import json
import tempfile
from pathlib import Path

import datasets
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from mtl_dist.config import Config, DataConfig, TaskConfig
from mtl_dist.data import (
    IGNORE_INDEX,
    _label_text,
    build_label_maps,
    load_raw,
    tokenize,
)
from mtl_dist.errors import ConfigError

pytestmark = pytest.mark.slow

SETTINGS = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats()
    | st.text(max_size=12)
    | st.sampled_from(["", "  ", "a", "b", "1", "1.0", "\u00e9t\u00e9", "\t"])
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=4,
)
# Mostly what a data file holds (so that many examples get through to tokenising),
# sometimes anything at all.
texts = st.one_of(
    *[st.sampled_from(["the soup was great", "awful", "ok", "caf\u00e9 " * 30])] * 6,
    st.text(min_size=1, max_size=30),
    values,
)
labels = st.one_of(
    *[st.sampled_from(["a", "b", " b ", 1, 2, 1.0, "1", True])] * 6, values
)
plausible_rows = st.lists(
    st.fixed_dictionaries({"text": texts, "label": labels}, optional={"x": values}),
    min_size=2,
    max_size=8,
)
wild_rows = st.lists(
    st.fixed_dictionaries({}, optional={"text": values, "label": values, "x": values}),
    max_size=8,
)
rows = plausible_rows | wild_rows


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module", autouse=True)
def private_datasets_cache(tmp_path_factory):
    # Hundreds of random files must not pile up in the user's datasets cache.
    saved = datasets.config.HF_DATASETS_CACHE
    datasets.config.HF_DATASETS_CACHE = tmp_path_factory.mktemp("hf_datasets_cache")
    yield
    datasets.config.HF_DATASETS_CACHE = saved


def load_label_tokenize(files: dict[str, bytes], ext: str, tokenizer) -> None:
    """The data path of a run on these files: succeeds or raises ConfigError."""
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for split, content in files.items():
            path = Path(tmp) / f"{split}{ext}"
            path.write_bytes(content)
            paths[f"{split}_file"] = str(path)
        cfg = Config(
            tasks=[TaskConfig("label")],
            data=DataConfig(max_length=16, **paths),  # replaces the default data
        )
        try:
            raw = load_raw(cfg.data, cfg.tasks)
            maps = build_label_maps(raw["train"], cfg.tasks)
            data = tokenize(raw, tokenizer, cfg, maps)
        except ConfigError as exc:
            assert "Fix:" in str(exc)
            event(f"refused: {exc.key.split('.')[-1]}")  # --hypothesis-show-statistics
            return
        event("loaded")
        # What went through is well formed: a class id (or "no label") per row.
        for ds in data.splits.values():
            classes = range(len(maps["label"]))
            assert all(c == IGNORE_INDEX or c in classes for c in ds["label_0"])
            assert all(1 <= n <= 16 for n in ds["length"])


def as_jsonl(records: list[dict], junk: list[str]) -> bytes:
    lines = [json.dumps(r) for r in records] + junk
    return ("\n".join(lines) + ("\n" if lines else "")).encode()


def as_delimited(records: list[dict], sep: str) -> bytes:
    names = sorted({k for r in records for k in r}) or ["text"]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=names, delimiter=sep)
    writer.writeheader()
    for record in records:
        writer.writerow(
            {
                k: json.dumps(v) if not isinstance(v, str) else v
                for k, v in record.items()
            }
        )
    return out.getvalue().encode()


@SETTINGS
@given(
    train=rows,
    validation=rows,
    junk=st.one_of(*[st.just([])] * 3, st.lists(st.text(max_size=10), max_size=2)),
    ext=st.sampled_from([".jsonl", ".json"]),
)
def test_random_json_lines_never_crash(train, validation, junk, ext, tokenizer):
    files = {"train": as_jsonl(train, junk), "validation": as_jsonl(validation, [])}
    load_label_tokenize(files, ext, tokenizer)


@SETTINGS
@given(
    train=rows,
    test=rows,
    sep=st.one_of(*[st.none()] * 3, st.sampled_from([",", ";", "\t", "|"])),
    ext=st.sampled_from([".csv", ".tsv"]),
)
def test_random_csv_never_crashes(train, test, sep, ext, tokenizer):
    sep = sep or ("\t" if ext == ".tsv" else ",")  # mostly the right one
    files = {"train": as_delimited(train, sep), "test": as_delimited(test, sep)}
    load_label_tokenize(files, ext, tokenizer)


@SETTINGS
@given(
    content=st.binary(max_size=300)
    | st.text(max_size=300).map(str.encode)
    | st.sampled_from([b"\xef\xbb\xbf", b"{}\n", b"[]", b"null", b'{"text": "a"}']),
    ext=st.sampled_from([".jsonl", ".json", ".csv", ".tsv", ".parquet"]),
)
def test_random_bytes_never_crash(content, ext, tokenizer):
    load_label_tokenize({"train": content}, ext, tokenizer)


clean_texts = st.text(
    st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=40
).filter(str.strip)
clean_labels = st.sampled_from(
    ["a", "b", " b ", "c", 1, 2, 1.0, 2.5, "1", True, False, None, ""]
)


@SETTINGS
@given(
    train=st.lists(st.tuples(clean_texts, clean_labels), min_size=1, max_size=12),
    validation=st.lists(st.tuples(clean_texts, clean_labels), min_size=1, max_size=6),
)
def test_every_label_maps_to_its_class(train, validation, tokenizer):
    with tempfile.TemporaryDirectory() as tmp:
        for split, pairs in (("train", train), ("validation", validation)):
            records = [{"text": t, "label": v} for t, v in pairs]
            Path(tmp, f"{split}.jsonl").write_text(
                "".join(json.dumps(r) + "\n" for r in records), encoding="utf-8"
            )
        cfg = Config(tasks=[TaskConfig("label")], data=DataConfig(dataset=tmp))
        raw = load_raw(cfg.data)
        try:
            maps = build_label_maps(raw["train"], cfg.tasks)
            data = tokenize(raw, tokenizer, cfg, maps)
        except ConfigError as exc:
            # Only two refusals are possible here: too few classes in train, or a
            # validation label train never had.
            assert "distinct label" in str(exc) or "never seen in train" in str(exc)
            event(f"refused: {exc.key}")
            return
    event("loaded")
    classes = maps["label"]
    assert classes == sorted({_label_text(v) for _, v in train} - {None})
    for split, pairs in (("train", train), ("validation", validation)):
        expected = [
            IGNORE_INDEX if _label_text(v) is None else classes.index(_label_text(v))
            for _, v in pairs
        ]
        assert list(data.splits[split]["label_0"]) == expected


@given(n=st.integers(-(2**53), 2**53))
def test_a_number_and_its_text_are_one_label(n):
    assert _label_text(n) == _label_text(float(n)) == _label_text(str(n)) == str(n)


@given(value=scalars)
def test_a_label_survives_a_json_round_trip(value):
    try:
        again = json.loads(json.dumps(value))
    except ValueError:
        return
    assert _label_text(again) == _label_text(value)

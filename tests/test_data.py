"""Sampling, sharding, label maps and tokenisation."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from mtl_dist.config import Config, DataConfig, TaskConfig
from mtl_dist.data import (
    IGNORE_INDEX,
    GlobalBatchSampler,
    build_label_maps,
    eval_batches,
    load_raw,
    tokenize,
)
from mtl_dist.errors import ConfigError
from tests.conftest import make_rows, write_jsonl


def global_batches(
    n, global_bs, micro, world, seed=0, epoch=0, lengths=None, group_size=4
):
    """Reassemble each step's global batch from the micro-batches of every rank."""
    per_rank = []
    for rank in range(world):
        sampler = GlobalBatchSampler(
            n, global_bs, micro, world, rank, seed, lengths, group_size
        )
        sampler.set_epoch(epoch)
        per_rank.append(list(sampler))
    accumulation = global_bs // (micro * world)
    steps = []
    for step in range(n // global_bs):
        batch = []
        for micro_step in range(accumulation):
            for rank in range(world):
                batch += per_rank[rank][step * accumulation + micro_step]
        steps.append(batch)
    return steps


@pytest.mark.parametrize("world,micro", [(2, 8), (4, 4), (1, 8), (2, 4), (8, 2)])
def test_global_batches_do_not_depend_on_world_size(world, micro):
    reference = global_batches(100, 16, 16, 1)
    assert [sorted(b) for b in global_batches(100, 16, micro, world)] == [
        sorted(b) for b in reference
    ]


def test_sampler_shards_are_disjoint_and_reshuffled_each_epoch():
    steps = global_batches(96, 16, 8, 2, epoch=0)
    flat = list(itertools.chain.from_iterable(steps))
    assert sorted(flat) == list(range(96))
    assert global_batches(96, 16, 8, 2, epoch=1) != steps


@pytest.mark.parametrize("world,micro", [(1, 4), (2, 4), (2, 2)])
def test_every_rank_knows_each_whole_global_batch(world, micro):
    # The trainer counts a global batch's labels from this, without a collective.
    for rank in range(world):
        sampler = GlobalBatchSampler(100, 16, micro, world, rank, seed=5)
        sampler.set_epoch(2)
        assembled = global_batches(100, 16, micro, world, seed=5, epoch=2)
        assert [sorted(sampler.global_batch(s).tolist()) for s in range(6)] == [
            sorted(b) for b in assembled
        ]


def test_sampler_skips_steps_already_taken():
    sampler = GlobalBatchSampler(64, 8, 4, 1, 0, seed=3)
    full = list(sampler)
    sampler.set_epoch(0, start_step=5)
    assert list(sampler) == full[10:]
    assert len(sampler) == len(full) - 10


def skewed_lengths(n, seed=5):
    """Sentence-like token counts: mostly short, a long tail, many ties."""
    rng = np.random.default_rng(seed)
    return np.minimum(rng.geometric(1 / 15, n) + 2, 128)


def padding_share(batches, lengths):
    real = sum(int(lengths[b].sum()) for b in batches)
    padded = sum(len(b) * int(lengths[b].max()) for b in batches)
    return 1 - real / padded


@pytest.mark.parametrize("world,micro", [(2, 8), (4, 4), (1, 8), (2, 4), (8, 2)])
def test_grouped_global_batches_do_not_depend_on_world_size(world, micro):
    lengths = skewed_lengths(200)
    reference = global_batches(200, 16, 16, 1, lengths=lengths)
    # Not only the same rows: the same order inside each batch, so that the micro-batches
    # of any split are runs of similar length.
    assert global_batches(200, 16, micro, world, lengths=lengths) == reference


def test_grouping_reduces_padding_and_keeps_every_example_once():
    lengths = skewed_lengths(960)
    plain = global_batches(960, 16, 8, 2)
    grouped = global_batches(960, 16, 8, 2, lengths=lengths, group_size=8)
    assert sorted(itertools.chain.from_iterable(grouped)) == list(range(960))
    assert padding_share(grouped, lengths) < 0.5 * padding_share(plain, lengths)
    # Micro-batches of one global batch are cut from its length order.
    for batch in grouped:
        assert list(lengths[batch]) == sorted(lengths[batch])
    # The longest row of the epoch comes first: out-of-memory shows at the first step.
    assert lengths[grouped[0]].max() == lengths.max()


def test_grouped_batches_stay_random():
    lengths = skewed_lengths(960)
    epoch0 = global_batches(960, 16, 16, 1, lengths=lengths, group_size=8)
    assert (
        global_batches(960, 16, 16, 1, lengths=lengths, group_size=8, epoch=1) != epoch0
    )
    assert (
        global_batches(960, 16, 16, 1, seed=1, lengths=lengths, group_size=8) != epoch0
    )
    # Batch order is shuffled, not sorted by length across the epoch.
    maxima = [int(lengths[b].max()) for b in epoch0[1:]]
    assert maxima != sorted(maxima) and maxima != sorted(maxima, reverse=True)


def test_incomplete_last_batch_is_left_for_another_epoch():
    lengths = skewed_lengths(100)
    steps = global_batches(100, 16, 8, 2, lengths=lengths)
    flat = list(itertools.chain.from_iterable(steps))
    assert len(steps) == 6 and len(set(flat)) == len(flat) == 96


def test_grouped_sampler_skips_steps_already_taken():
    lengths = skewed_lengths(64)
    sampler = GlobalBatchSampler(64, 8, 4, 1, 0, seed=3, lengths=lengths, group_size=2)
    full = list(sampler)
    sampler.set_epoch(0, start_step=5)
    assert list(sampler) == full[10:]
    sampler.set_epoch(1)
    assert list(sampler) != full


def test_ungrouped_order_is_the_seeded_permutation():
    import torch

    sampler = GlobalBatchSampler(50, 8, 8, 1, 0, seed=9)
    sampler.set_epoch(2)
    perm = torch.randperm(50, generator=torch.Generator().manual_seed(11)).tolist()
    assert list(sampler) == [perm[i : i + 8] for i in range(0, 48, 8)]


@pytest.mark.parametrize("n,world,bs", [(31, 2, 4), (31, 3, 4), (2, 3, 8), (100, 8, 7)])
def test_eval_batches_cover_every_example_once(n, world, bs):
    lengths = [(i * 7) % 13 + 1 for i in range(n)]
    per_rank = [eval_batches(lengths, r, world, bs) for r in range(world)]
    # Same number of forward passes everywhere (ZeRO-3 needs it).
    assert len({len(b) for b in per_rank}) == 1
    seen = [i for batches in per_rank for idx, real in batches if real for i in idx]
    assert sorted(seen) == list(range(n))


def test_label_maps_sorted_from_train_or_fixed(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", make_rows(20, 0))
    raw = load_raw(DataConfig(dataset=str(tmp_path)))
    maps = build_label_maps(
        raw["train"],
        [TaskConfig("topic"), TaskConfig("m", "mood", ["positive", "negative"])],
    )
    assert maps == {"topic": ["food", "sport", "tech"], "m": ["positive", "negative"]}


def test_missing_labels_are_ignored_per_task(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    rows = make_rows(6, 0)
    rows[0]["mood"] = None
    rows[1]["topic"] = ""
    write_jsonl(tmp_path / "train.jsonl", rows)
    cfg = Config(
        tasks=[TaskConfig("topic"), TaskConfig("mood")],
        data=DataConfig(dataset=str(tmp_path)),
    )
    raw = load_raw(cfg.data)
    maps = build_label_maps(raw["train"], cfg.tasks)
    data = tokenize(raw, AutoTokenizer.from_pretrained(tiny_model_dir), cfg, maps)
    train = data.splits["train"]
    assert train[0]["label_1"] == IGNORE_INDEX and train[0]["label_0"] != IGNORE_INDEX
    assert train[1]["label_0"] == IGNORE_INDEX and train[1]["label_1"] != IGNORE_INDEX


def test_unseen_validation_label_is_a_config_error(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    write_jsonl(tmp_path / "train.jsonl", make_rows(20, 0))
    bad = make_rows(3, 1)
    bad[2]["topic"] = "music"
    write_jsonl(tmp_path / "validation.jsonl", bad)
    cfg = Config(
        tasks=[TaskConfig("topic"), TaskConfig("mood")],
        data=DataConfig(dataset=str(tmp_path)),
    )
    raw = load_raw(cfg.data)
    maps = build_label_maps(raw["train"], cfg.tasks)
    with pytest.raises(ConfigError) as err:
        tokenize(raw, AutoTokenizer.from_pretrained(tiny_model_dir), cfg, maps)
    assert "tasks.topic.labels" in str(err.value) and "music" in str(err.value)


@pytest.mark.parametrize("ext", ["csv", "tsv", "parquet"])
def test_other_file_formats_load(tmp_path, ext):
    import pandas as pd

    frame = pd.DataFrame(make_rows(10, 0))
    path = tmp_path / f"train.{ext}"
    if ext == "parquet":
        frame.to_parquet(path)
    else:
        frame.to_csv(path, sep="\t" if ext == "tsv" else ",", index=False)
    raw = load_raw(DataConfig(train_file=str(path)))
    assert raw["train"].num_rows == 10 and "mood" in raw["train"].column_names


def test_builtin_default_data_is_packaged():
    raw = load_raw(DataConfig())
    assert {k: v.num_rows for k, v in raw.items()} == {
        "train": 2400,
        "validation": 300,
        "test": 300,
    }


def test_sentence_pairs_get_two_segments(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    rows = make_rows(4, 0)
    for row in rows:
        row["context"] = "what happened before"
    write_jsonl(tmp_path / "train.jsonl", rows)
    cfg = Config(
        tasks=[TaskConfig("topic")],
        data=DataConfig(dataset=str(tmp_path), text_pair_column="context"),
    )
    raw = load_raw(cfg.data)
    data = tokenize(
        raw,
        AutoTokenizer.from_pretrained(tiny_model_dir),
        cfg,
        build_label_maps(raw["train"], cfg.tasks),
    )
    assert 1 in data.splits["train"][0]["token_type_ids"]

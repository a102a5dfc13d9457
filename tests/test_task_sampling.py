"""The task sampler: one source per global batch, the same draws on every rank, state
that a resumed run continues; and the data path that feeds it (per-task files, dialogue
context)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mtl_dist.config import Config, DataConfig, TaskConfig
from mtl_dist.data import (
    CONTEXT_COLUMN,
    IGNORE_INDEX,
    SOURCE_COLUMN,
    TaskBatchSampler,
    build_label_maps,
    conversation_context,
    label_key,
    load_raw,
    tokenize,
)
from mtl_dist.errors import ConfigError
from tests.conftest import make_rows, write_jsonl

# Three sources of 40, 160 and 600 rows.
SOURCES = np.repeat([0, 1, 2], [40, 160, 600])
GLOBAL = 16


def sampler(method="proportional", rank=0, world=1, micro=GLOBAL, **kw):
    return TaskBatchSampler(
        SOURCES,
        method,
        kw.pop("temperature", 2.0),
        GLOBAL,
        micro,
        world,
        rank,
        11,
        **kw,
    )


def draw_frequencies(s: TaskBatchSampler, epochs: int) -> np.ndarray:
    counts = sum(np.bincount(s.draws(e), minlength=3) for e in range(epochs))
    return counts / counts.sum()


def test_every_global_batch_comes_from_one_source_and_ranks_split_it():
    world, micro = 2, 4  # accumulation 2
    ranks = [sampler(rank=r, world=world, micro=micro) for r in range(world)]
    for epoch in (0, 3):
        for s in ranks:
            s.set_epoch(epoch)
        per_rank = [list(s) for s in ranks]
        for step in range(ranks[0].steps_per_epoch):
            batch = ranks[0].global_batch(step)
            assert torch.equal(batch, ranks[1].global_batch(step))
            assert len(set(SOURCES[batch.numpy()])) == 1
            chunks = [per_rank[r][step * 2 + k] for k in range(2) for r in range(world)]
            assert sorted(sum(chunks, [])) == sorted(batch.tolist())
        assert np.array_equal(ranks[0].draws(epoch), ranks[1].draws(epoch))


def test_proportional_and_temperature_draw_as_defined():
    sizes = np.array([40, 160, 600])
    assert draw_frequencies(sampler(), 40) == pytest.approx(sizes / 800, abs=0.02)
    scaled = sizes**0.5
    freqs = draw_frequencies(sampler("temperature"), 40)
    assert freqs == pytest.approx(scaled / scaled.sum(), abs=0.02)
    one = draw_frequencies(sampler("temperature", temperature=1.0), 40)
    assert one == pytest.approx(sizes / 800, abs=0.02)
    hot = draw_frequencies(sampler("temperature", temperature=1e6), 40)
    assert hot == pytest.approx([1 / 3] * 3, abs=0.03)


def test_round_robin_cycles_across_epochs():
    s = sampler("round_robin")
    steps = s.steps_per_epoch  # 50: not a multiple of 3, so epochs continue the cycle
    sequence = np.concatenate([s.draws(e) for e in range(3)])
    assert sequence.tolist() == [i % 3 for i in range(3 * steps)]


def test_each_source_streams_through_all_its_rows():
    s = sampler()
    seen = np.zeros(len(SOURCES), dtype=int)
    for epoch in range(12):
        s.set_epoch(epoch)
        for batch in s:
            np.add.at(seen, batch, 1)  # a batch across two passes may repeat a row
    for source in range(3):
        counts = seen[source == SOURCES]
        # A stream is consecutive full permutations: counts differ by at most one pass.
        assert counts.max() - counts.min() <= 1, source


def test_state_resumes_mid_epoch_and_refuses_other_data():
    s = sampler(lengths=np.arange(len(SOURCES)) % 23, group_size=2)
    s.set_epoch(2)
    expected = list(s)[5:]
    s.set_epoch(2, 5)
    state = s.state_dict()
    assert state["consumed"] == s.consumed_before(2)
    resumed = sampler(lengths=np.arange(len(SOURCES)) % 23, group_size=2)
    resumed.load_state_dict(state)
    assert list(resumed) == expected
    other = TaskBatchSampler(
        SOURCES[:-16], "proportional", 2.0, GLOBAL, GLOBAL, 1, 0, 11
    )
    with pytest.raises(ConfigError, match="data"):
        other.load_state_dict(state)
    with pytest.raises(ConfigError, match="task_sampling"):
        sampler("round_robin").load_state_dict(state)


def test_length_grouping_stays_inside_a_source():
    lengths = np.random.default_rng(0).integers(3, 60, len(SOURCES))
    s = sampler(lengths=lengths, group_size=4)
    s.set_epoch(1)
    for step in range(s.steps_per_epoch):
        batch = s.global_batch(step).numpy()
        assert len(set(SOURCES[batch])) == 1
    spread = np.mean(
        [np.ptp(lengths[s.global_batch(k).numpy()]) for k in range(s.steps_per_epoch)]
    )
    assert spread < 20  # random batches of these lengths spread over about 50


# ---------------------------------------------------------------------------------------
# Per-task files and dialogue context in the data path.


@pytest.fixture
def per_task_dir(tmp_path):
    shared = make_rows(24, 1)
    topic_only = [
        {"id": r["id"], "text": r["text"], "topic": r["topic"]}
        for r in make_rows(40, 2)
    ]
    mood_only = [{"text": r["text"], "mood": r["mood"]} for r in make_rows(16, 3)]
    write_jsonl(tmp_path / "train.jsonl", shared)
    write_jsonl(tmp_path / "topic.jsonl", topic_only)
    write_jsonl(tmp_path / "mood.jsonl", mood_only)
    write_jsonl(tmp_path / "mood_val.jsonl", mood_only[:5])
    return tmp_path


def test_per_task_files_merge_with_sources_and_masked_labels(
    per_task_dir, tiny_model_dir
):
    from transformers import AutoTokenizer

    cfg = Config(
        tasks=[
            TaskConfig("topic", train_file=str(per_task_dir / "topic.jsonl")),
            TaskConfig(
                "mood",
                train_file=str(per_task_dir / "mood.jsonl"),
                validation_file=str(per_task_dir / "mood_val.jsonl"),
            ),
        ],
        data=DataConfig(train_file=str(per_task_dir / "train.jsonl")),
    )
    raw = load_raw(cfg.data, cfg.tasks)
    train = raw["train"]
    assert len(train) == 24 + 40 + 16
    assert np.bincount(train[SOURCE_COLUMN]).tolist() == [24, 40, 16]
    data = tokenize(
        raw,
        AutoTokenizer.from_pretrained(tiny_model_dir),
        cfg,
        build_label_maps(train, cfg.tasks),
    )
    tokens = data.splits["train"]
    topic, mood = np.array(tokens[label_key(0)]), np.array(tokens[label_key(1)])
    source = np.array(tokens[SOURCE_COLUMN])
    assert (topic[source == 2] == IGNORE_INDEX).all()  # mood's rows: no topic
    assert (mood[source == 1] == IGNORE_INDEX).all()
    assert (topic[source != 2] != IGNORE_INDEX).all()
    assert len(data.splits["validation"]) == 5


def test_a_task_file_without_its_label_column_is_refused(per_task_dir):
    tasks = [TaskConfig("topic", train_file=str(per_task_dir / "mood.jsonl"))]
    with pytest.raises(ConfigError, match="tasks.topic.label_column"):
        load_raw(DataConfig(train_file=str(per_task_dir / "train.jsonl")), tasks)


def test_sampling_without_sources_is_refused(tiny_data_dir):
    from mtl_dist.data import train_sampler

    cfg = Config(
        tasks=[TaskConfig("topic"), TaskConfig("mood")],
        data=DataConfig(dataset=str(tiny_data_dir), task_sampling="proportional"),
    )
    import datasets

    train = datasets.Dataset.from_dict({"length": [5] * 32})
    with pytest.raises(ConfigError, match="data.task_sampling"):
        train_sampler(train, cfg, 8, 8, 1, 0)


def dialogue_split():
    import datasets

    # Two interleaved conversations, turns out of file order in one of them.
    rows = [
        ("d-1-0", "hello"),
        ("d-2-0", "hi there"),
        ("d-1-2", "fine thanks"),
        ("d-1-1", "how are you"),
        ("d-2-1", "bye"),
    ]
    return datasets.Dataset.from_dict(
        {"id": [r[0] for r in rows], "text": [r[1] for r in rows]}
    )


def test_context_takes_preceding_turns_of_the_same_conversation():
    cfg = DataConfig(
        context_turns=2,
        context_group_column="id",
        context_id_pattern=r"(?P<group>.+)-(?P<order>\d+)$",
    )
    context = conversation_context(dialogue_split(), cfg, "train")
    assert context == [
        [],
        [],
        ["how are you", "hello"],  # most recent first
        ["hello"],
        ["hi there"],
    ]
    one = DataConfig(
        context_turns=1,
        context_group_column="id",
        context_id_pattern=cfg.context_id_pattern,
    )
    assert conversation_context(dialogue_split(), one, "train")[2] == ["how are you"]


def test_context_pattern_that_does_not_match_names_the_row():
    cfg = DataConfig(
        context_turns=1,
        context_group_column="id",
        context_id_pattern=r"^x(?P<group>\d)",
    )
    with pytest.raises(ConfigError, match="row 1 of the train split"):
        conversation_context(dialogue_split(), cfg, "train")


def test_context_is_the_second_segment_of_the_encoding(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    rows = [
        {"id": "a-0", "text": "hello", "topic": "x", "mood": "p"},
        {"id": "a-1", "text": "goodbye", "topic": "y", "mood": "n"},
    ]
    write_jsonl(tmp_path / "train.jsonl", rows)
    cfg = Config(
        tasks=[TaskConfig("topic"), TaskConfig("mood")],
        data=DataConfig(
            dataset=str(tmp_path),
            context_turns=1,
            context_group_column="id",
            context_id_pattern=r"(?P<group>.+)-(?P<order>\d+)$",
        ),
    )
    raw = load_raw(cfg.data, cfg.tasks)
    assert raw["train"][CONTEXT_COLUMN] == [[], ["hello"]]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    data = tokenize(raw, tokenizer, cfg, build_label_maps(raw["train"], cfg.tasks))
    second = tokenizer.decode(data.splits["train"][1]["input_ids"])
    assert second == "[CLS] goodbye [SEP] hello [SEP]"
    assert "token_type_ids" in data.input_columns


def test_context_needs_a_group_column():
    with pytest.raises(ConfigError, match="data.context_group_column"):
        DataConfig(context_turns=1)

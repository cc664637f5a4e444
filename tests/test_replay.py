"""Replay against forgetting: which rows are replay, that fraction 0 changes nothing, a real run resumed exactly."""

import json
import math
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from conftest import FAST, assert_same_training, kill_after_first_checkpoint, run_here

from transfer.config.compose import check_command_line, compose_config
from transfer.data.blocks import separator_id, tokenize
from transfer.data.sequences import ExampleStream
from transfer.data.sources import python_docs_prose
from transfer.errors import TransferError
from transfer.models.load import load_model_and_tokenizer
from transfer.objectives import build_objective

PER_STEP = ["block_size=64", "micro_batch_size=4", "grad_accum_steps=2"]  # 8 rows a step
ROWS = 8


def prepared(*overrides: str):
    """(objective, its splits, config) of the default experiment, prepared as a run prepares it."""
    cfg = compose_config([*PER_STEP, *overrides])
    _, tokenizer = load_model_and_tokenizer(cfg.model, cfg.block_size, weights=False)
    objective = build_objective(cfg, tokenizer)
    return objective, objective.prepare(cfg.eval.max_tokens), cfg


@pytest.fixture(scope="module")
def without():
    return prepared()


@pytest.fixture(scope="module", params=[0.1, 0.25, 0.5])
def mixed(request):
    return prepared(f"dataset.replay={request.param}")


def steps(objective, train, seed: int, n: int, micro: int = 4, accum: int = 2, start: int = 0) -> list[list[int]]:
    """The rows (indices: the training blocks', then the replay blocks' after them) of n optimizer steps."""
    stream = objective.stream(train, seed, start, micro * accum)
    rows = []
    for _ in range(n):
        rows.append([stream.next() for _ in range(micro * accum)])
    return rows


def test_fraction_zero_draws_the_batches_of_a_run_without_replay(without):
    objective, splits, cfg = without
    train = splits["train"]
    stream = objective.stream(train, cfg.seed, 0, ROWS)
    plain = ExampleStream(train.lengths(), cfg.seed)  # the order training had before replay existed
    for _ in range(10):
        batch = objective.batch(train, stream, 4)
        expected = torch.stack([train.get(plain.next())[0] for _ in range(4)])
        assert torch.equal(batch.input_ids, expected)
    assert objective.data_summary() == {"replay": {"fraction": 0.0, "source": None, "blocks": 0}}


def test_each_step_holds_the_floor_of_its_rows_times_the_fraction(mixed):
    objective, splits, cfg = mixed
    train, f = splits["train"], Fraction(str(cfg.dataset.replay))
    counts = [sum(i >= len(train) for i in step) for step in steps(objective, train, cfg.seed, 40)]
    assert counts == [math.floor((s + 1) * ROWS * f) - math.floor(s * ROWS * f) for s in range(40)]
    assert sum(counts) == math.floor(40 * ROWS * f)  # of the first j rows, floor(j * f)
    if ROWS * f == int(ROWS * f):  # 0.25 and 0.5 of 8 rows: the same number every step
        assert set(counts) == {ROWS * f}


def test_the_training_blocks_keep_their_order_between_the_replay_rows(mixed, without):
    objective, splits, cfg = mixed
    rows = [i for step in steps(objective, splits["train"], cfg.seed, 30) for i in step]
    own = [i for i in rows if i < len(splits["train"])]
    today = [i for step in steps(without[0], without[1]["train"], cfg.seed, 30) for i in step]
    assert own == today[: len(own)]


def test_a_step_holds_the_same_rows_however_it_is_split(mixed):
    objective, splits, cfg = mixed
    by = {(m, a): steps(objective, splits["train"], cfg.seed, 12, m, a) for m, a in ((8, 1), (2, 4), (1, 8))}
    first = [sorted(step) for step in by[(8, 1)]]
    assert all([sorted(step) for step in rows] == first for rows in by.values())


def test_a_stream_started_at_any_row_continues_as_if_it_had_run(mixed):
    objective, splits, cfg = mixed
    train = splits["train"]
    stream = objective.stream(train, cfg.seed, 0, ROWS)
    straight = [stream.next() for _ in range(80)]
    for start in (0, 7, 37, 41):
        again = objective.stream(train, cfg.seed, start, ROWS)
        assert [again.next() for _ in range(80 - start)] == straight[start:]
    stream.position = 37  # a step tried again after out of memory
    assert [stream.next() for _ in range(10)] == straight[37:47]


def test_replay_text_is_the_documentation_that_no_probe_scores(mixed):
    objective, _, cfg = mixed
    blocks = objective.replay_split
    text = objective.tokenizer.decode(blocks.ids)
    probe = python_docs_prose("heldout")
    assert not [p for p in probe if p in text]
    general = python_docs_prose("train")
    assert not set(general) & set(probe)  # the probe's part leaves out the paragraphs the train topics repeat
    _, eos = separator_id(objective.tokenizer, "eos")
    ids, _ = tokenize(general, objective.tokenizer, eos)
    assert objective.data_summary()["replay"] == {
        "fraction": cfg.dataset.replay, "source": "python_docs:train", "blocks": len(ids) // cfg.block_size,
        "documents": len(general), "tokens": len(ids) // cfg.block_size * cfg.block_size,
    }  # fmt: skip


@pytest.mark.parametrize("bad,message", [
    (["dataset.replay=1"], "dataset.replay=1.0: allowed a fraction of the training rows in [0, 1)"),
    (["dataset.replay=-0.1"], "dataset.replay=-0.1: allowed a fraction of the training rows in [0, 1)"),
    (["dataset.replay=0.1", "objective=sft"],
     "dataset.replay=0.1 mixes blocks of text into objective=lm's training; objective=sft allows only 0"),
    (["dataset.replay_source=wiki"],
     "dataset.replay_source='wiki': allowed python_docs, or a list of .txt/.jsonl/.json/.csv/.parquet files"),
    (["dataset.replay=0.1", "dataset.replay_source=[/no/such.jsonl]"], "dataset.replay_source: no such file"),
])  # fmt: skip
def test_bad_replay_settings_are_one_line(bad, message):
    with pytest.raises(TransferError) as e:
        check_command_line(bad)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_replay_of_a_probe_s_own_text_is_refused(tmp_path):
    probe = tmp_path / "probe.jsonl"
    probe.write_text(json.dumps({"text": "General English prose, long enough to be a document of its own."}) + "\n")
    with pytest.raises(TransferError) as e:
        check_command_line(["dataset.replay=0.1", f"dataset.replay_source=[{probe}]", "eval/probes=[wikitext]",
                            f"eval.probes.wikitext.files=[{probe}]"])  # fmt: skip
    assert (
        str(e.value)
        == f"dataset.replay_source holds {probe}, which probe 'wikitext' scores; allowed: text that no probe scores"
    )
    with pytest.raises(TransferError) as e:
        check_command_line(["dataset.replay=0.1", "eval.probes.python_docs.part=all"])
    assert str(e.value) == (
        "dataset.replay_source=python_docs trains on topics that probe 'python_docs' scores (part=all); "
        "allowed: that probe's part=heldout, or replay files"
    )
    check_command_line(["dataset.replay=0", "eval.probes.python_docs.part=all"])  # no replay: nothing to keep apart


# a real run with a quarter of each step's rows replayed, checkpointed every 5 steps for the resume
REPLAY = [*FAST, "max_steps=20", "eval_interval=10", "checkpoint.interval=5", "log_interval=1",
          "dataset.replay=0.25"]  # fmt: skip


@pytest.fixture(scope="module")
def replay_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("replay")
    run_here(REPLAY, root / "run")
    return root / "run"


def test_a_run_with_replay_completes_and_records_it(replay_run):
    r = json.loads((replay_run / "metrics.json").read_text())
    assert r["status"] == "completed"
    replay = r["data"]["replay"]
    assert (replay["fraction"], replay["source"]) == (0.25, "python_docs:train") and replay["blocks"] > 100
    rows = 20 * 8
    assert r["train"]["samples"] == rows and r["train"]["tokens"] == rows * 64  # replay rows train too
    assert r["train"]["epochs"] == pytest.approx((rows - rows // 4) / r["data"]["train"]["sequences"])
    assert r["eval"]["final"]["validation"]["loss"] < r["eval"]["baseline"]["validation"]["loss"]


def test_a_run_with_replay_resumes_exactly(replay_run, tmp_path):
    kill_after_first_checkpoint([*REPLAY, "hydra.run.dir=run"], tmp_path)
    run_here([*REPLAY, "resume=true"], tmp_path / "run")
    resumed = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert resumed["train"]["resumed_from_step"] in range(5, 20, 5)
    assert_same_training(resumed, json.loads((replay_run / "metrics.json").read_text()))

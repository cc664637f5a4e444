"""The aggregator groups jobs by what they ran, not by how their command lines spelt it (records written by hand)."""

import json
import math
import statistics
from pathlib import Path

import pandas as pd
import yaml

from transfer.aggregate.__main__ import main
from transfer.aggregate.jobs import read_jobs
from transfer.aggregate.tables import comparison, for_people

# what +experiment=qwen_strategies sets, as a record's resolved config holds it
PRESET = {"block_size": 128, "max_steps": 12, "micro_batch_size": 2, "eval": {"max_tokens": 2048}}
SPELT = ["model=qwen2_5_coder_0_5b", "block_size=128", "max_steps=12", "micro_batch_size=2", "eval.max_tokens=2048"]
RATES = {"full": 1e-4, "lora": 3e-3}  # each strategy's own rate (strategy.lr), used where optimizer.lr is null


def record(overrides: list[str], strategy: str, lr: float | None, seed: int, val: float, **settings) -> dict:
    """A completed record as run.py writes one: the overrides as given, the resolved config, the choices."""
    config = {"seed": seed, **PRESET, **settings, "strategy": {"name": strategy, "lr": RATES[strategy]},
              "optimizer": {"name": "adamw", "lr": lr}}  # fmt: skip
    return {
        "status": "completed", "overrides": [*overrides, f"seed={seed}"], "config": config,
        "choices": {"model": "qwen2_5_coder_0_5b", "strategy": strategy, "dataset": "rust_concepts",
                    "optimizer": "adamw", "probes": "python_docs,instructions"},
        "params": {"trainable": 10, "total": 20}, "train": {"seconds": 1.0},
        "eval": {"final": {"validation": {"perplexity": val}, "test": {"perplexity": val + 5}}},
    }  # fmt: skip


def write(sweep: Path, records: list[dict]) -> Path:
    for i, rec in enumerate(records):
        (sweep / str(i)).mkdir(parents=True)
        (sweep / str(i) / "metrics.json").write_text(json.dumps(rec))
    return sweep


def val(strategy: str, lr: float, seed: int, block: int = 128) -> float:
    return {"full": 10.0, "lora": 12.0}[strategy] + 1000 * lr + seed / 10 + (block - 128) / 100


def test_two_spellings_of_the_same_settings_are_one_group(tmp_path):
    """`+experiment=qwen_strategies strategy=S optimizer.lr=LR` (seeds 1, 2) and the preset's values spelt out
    (seed 3): the same resolved config, so one group of three seeds per strategy and rate, and no column for the
    preset nor for the settings one sweep spelt out with the preset's values."""
    grid = [(s, lr) for s in ("full", "lora") for lr in (1e-3, 1e-4)]
    preset = write(tmp_path / "preset", [
        record(["+experiment=qwen_strategies", f"strategy={s}", f"optimizer.lr={lr}"], s, lr, seed, val(s, lr, seed))
        for s, lr in grid for seed in (1, 2)])  # fmt: skip
    spelt = write(tmp_path / "spelt", [
        record([*SPELT, f"strategy={s}", f"optimizer.lr={lr}"], s, lr, 3, val(s, lr, 3)) for s, lr in grid])  # fmt: skip
    jobs = read_jobs([preset, spelt])
    assert jobs["block_size"].tolist() == [128] * 12  # from the config where the preset set it
    assert jobs["experiment"].fillna("").tolist() == ["qwen_strategies"] * 8 + [""] * 4
    assert jobs.at[0, "overrides"] == "+experiment=qwen_strategies strategy=full optimizer.lr=0.001 seed=1"
    assert jobs.at[8, "overrides"].startswith("model=qwen2_5_coder_0_5b block_size=128 max_steps=12 ")
    table = comparison(jobs)
    assert table.attrs["group_keys"] == ["strategy", "optimizer.lr"]
    assert len(table) == 4 and table["seeds"].tolist() == [3] * 4
    for _, row in table.iterrows():
        expected = statistics.mean(val(row["strategy"], row["optimizer.lr"], seed) for seed in (1, 2, 3))
        assert math.isclose(row["val_ppl_after"], expected, rel_tol=1e-12)
    # a preset that set something no key shows (here log_interval) still tells its jobs apart from the defaults'
    defaults = write(tmp_path / "defaults", [
        record([f"strategy={s}", f"optimizer.lr={lr}"], s, lr, 1, val(s, lr, 1), log_interval=50) for s, lr in grid])  # fmt: skip
    apart = comparison(read_jobs([preset, defaults]))
    assert apart.attrs["group_keys"] == ["experiment", "strategy", "optimizer.lr"]
    assert sorted(apart["seeds"].tolist()) == [1] * 4 + [2] * 4


def test_a_value_given_by_a_preset_or_a_strategy_groups_with_the_same_value_given_on_the_command_line(tmp_path, capsys):
    """block_size from the preset in one sweep, on the command line (128 and 256) in the other; lora's rate from its
    strategy file (optimizer.lr null) in one, optimizer.lr=3e-3 in the other: grouped by value, and best_per_strategy
    names the values the picked group ran with, never `(default)`."""
    given = {"lora": ["strategy=lora"], "full": ["strategy=full", "optimizer.lr=1e-4"]}
    preset = write(tmp_path / "preset", [
        record(["+experiment=qwen_strategies", *given[s]], s, None if s == "lora" else 1e-4, seed,
               val(s, RATES[s], seed)) for s in ("lora", "full") for seed in (1, 2)])  # fmt: skip
    spelt = write(tmp_path / "spelt", [
        record([*SPELT[:1], f"block_size={b}", *SPELT[2:], f"strategy={s}", f"optimizer.lr={lr}"], s, lr, 3,
               val(s, lr, 3, b), block_size=b)
        for s, lr in (("lora", 3e-3), ("full", 1e-4), ("full", 1e-3)) for b in (128, 256)])  # fmt: skip
    out = tmp_path / "tables"
    assert main([str(preset), str(spelt), "--out", str(out)]) == 0
    capsys.readouterr()
    table = pd.read_csv(out / "comparison.csv")
    assert list(table.columns[:3]) == ["strategy", "optimizer.lr", "block_size"]
    seeds = table.set_index(["strategy", "optimizer.lr", "block_size"])["seeds"].to_dict()
    assert seeds == {("lora", 3e-3, 128): 3, ("lora", 3e-3, 256): 1, ("full", 1e-4, 128): 3, ("full", 1e-4, 256): 1,
                     ("full", 1e-3, 128): 1, ("full", 1e-3, 256): 1}  # fmt: skip
    best = pd.read_csv(out / "best_per_strategy.csv").set_index("strategy")
    assert best.at["full", "picked"] == "optimizer.lr=0.0001, block_size=128" and best.at["full", "candidates"] == 4
    assert best.at["lora", "picked"] == "optimizer.lr=0.003, block_size=128" and best.at["lora", "candidates"] == 2
    assert "(default)" not in (out / "best_per_strategy.md").read_text()


def test_a_job_without_a_config_in_its_record_reads_its_overrides_as_hydra_does(tmp_path):
    """A failed job's record from before records kept their config, and a killed job with Hydra's overrides.yaml
    only: their settings come from their overrides, as numbers where Hydra reads numbers, beside jobs whose
    records hold a config."""
    sweep = write(tmp_path / "sweep", [record(["strategy=lora", "optimizer.lr=1e-3"], "lora", 1e-3, 1, 12.0)])
    (sweep / "1").mkdir()
    old = {"status": "failed", "error": "CUDA out of memory", "overrides": ["strategy=lora", "optimizer.lr=1e-3",
           "seed=2", "hardware.compile=true"], "choices": {"strategy": "lora"}}  # fmt: skip
    (sweep / "1" / "metrics.json").write_text(json.dumps(old))
    (sweep / "2" / ".hydra").mkdir(parents=True)
    (sweep / "2" / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["strategy=lora", "optimizer.lr=1e-3",
                                                                             "seed=3", "hydra.job.chdir=false"]))  # fmt: skip
    jobs = read_jobs([sweep])
    assert jobs.attrs["override_keys"] == ["strategy", "optimizer.lr", "seed", "hardware.compile"]
    assert jobs["status"].tolist() == ["completed", "failed", "incomplete"]
    assert jobs["optimizer.lr"].tolist() == [1e-3] * 3 and jobs["seed"].tolist() == [1, 2, 3]
    assert jobs["hardware.compile"].tolist()[1] is True  # the completed job's config does not hold it: unset
    assert jobs["overrides"].tolist()[2] == "strategy=lora optimizer.lr=1e-3 seed=3"  # Hydra's own left out
    assert comparison(jobs).attrs["group_keys"] == ["strategy"]  # one completed job: nothing varies
    table = comparison(jobs, ["strategy", "optimizer.lr"])
    assert for_people(table, ["strategy", "optimizer.lr", "status"]).values.tolist() == [
        ["lora", "0.001", "completed"], ["lora", "0.001", "failed"], ["lora", "0.001", "incomplete"]]  # fmt: skip

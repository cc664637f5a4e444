"""`make tables` on a real small sweep: rows, seed statistics, failures, files, plots, notebook."""

import json
import math
import statistics
from pathlib import Path

import pandas as pd
import pytest
from conftest import run_cli

from transfer.aggregate import comparison, main

STEPS = ["max_steps=12", "eval_interval=6", "block_size=64", "micro_batch_size=4", "eval.max_tokens=4096", "eval.reference.max_tokens=4096",
         "checkpoint.enabled=false", "eval.max_new_tokens=4"]  # fmt: skip


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """tiny, two strategies x two seeds; plus a job failed in the job, one without a record, one with a damaged record."""
    root = tmp_path_factory.mktemp("agg")
    proc = run_cli(["-m", "strategy=full,lora", "seed=1,2", *STEPS, "hydra.sweep.dir=sweep"], cwd=root, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep = root / "sweep"
    assert (sweep / "tables" / "comparison.md").is_file(), "the end-of-sweep callback wrote no tables"
    # a target that only the loaded model can refuse: the job fails, and says so in its record
    bad = ["strategy=lora", "strategy.target_modules=[qkv]", *STEPS, f"hydra.run.dir={sweep / '4'}"]
    assert run_cli(bad, cwd=root).returncode == 1
    (sweep / "5" / ".hydra").mkdir(parents=True)
    (sweep / "5" / ".hydra" / "overrides.yaml").write_text("- strategy=lora\n- seed=3\n")
    (sweep / "6" / ".hydra").mkdir(parents=True)
    (sweep / "6" / ".hydra" / "overrides.yaml").write_text("- strategy=full\n- seed=4\n")
    (sweep / "6" / "metrics.json").write_text('{"status": "completed", "eval": {')  # cut short
    return sweep


def records(sweep: Path) -> list[dict]:
    return [json.loads((sweep / str(i) / "metrics.json").read_text()) for i in range(4)]


def test_table_rows_means_and_stds(sweep, capsys):
    assert main([str(sweep)]) == 0
    printed = capsys.readouterr().out
    assert "7 jobs (4 completed, 1 failed, 1 incomplete, 1 unreadable)" in printed
    table = pd.read_csv(sweep / "tables" / "comparison.csv")
    assert list(table["status"]) == ["completed", "completed", "failed", "incomplete", "unreadable"]
    assert set(table["strategy"][:2]) == {"full", "lora"}
    # sorted by final validation perplexity
    assert table["val_ppl_after"][0] <= table["val_ppl_after"][1]
    for strategy in ("full", "lora"):
        row = table[(table["strategy"] == strategy) & (table["status"] == "completed")].iloc[0]
        mine = [r for r in records(sweep) if r["choices"]["strategy"] == strategy]
        assert row["seeds"] == 2
        for column, value in [
            ("val_ppl_after", lambda r: r["eval"]["final"]["validation"]["perplexity"]),
            ("test_ppl_before", lambda r: r["eval"]["baseline"]["test"]["perplexity"]),
            ("ref_ppl_after", lambda r: r["eval"]["final"]["reference"]["perplexity"]),
            ("train_seconds", lambda r: r["train"]["seconds"]),
            ("trainable_params", lambda r: r["params"]["trainable"]),
        ]:
            values = [value(r) for r in mine]
            assert row[column] == pytest.approx(statistics.mean(values), rel=1e-12)
            assert row[f"{column}_std"] == pytest.approx(statistics.stdev(values), rel=1e-9, abs=1e-12)
    failed = table[table["status"] == "failed"].iloc[0]
    assert "'qkv' matches no linear projection" in failed["error"]
    incomplete = table[table["status"] == "incomplete"].iloc[0]
    assert incomplete["strategy"] == "lora" and int(incomplete["job"]) == 5
    unreadable = table[table["status"] == "unreadable"].iloc[0]
    assert unreadable["strategy"] == "full" and int(unreadable["job"]) == 6
    assert unreadable["error"].startswith("metrics.json is unreadable (")


def test_jobs_frame_has_override_columns_and_every_job(sweep):
    assert main([str(sweep)]) == 0
    jobs = pd.read_parquet(sweep / "tables" / "jobs.parquet")
    assert list(jobs.columns[:4]) == ["sweep", "job", "strategy", "seed"]
    assert len(jobs) == 7 and set(jobs["status"]) == {"completed", "failed", "incomplete", "unreadable"}
    assert "max_steps" in jobs.columns and "trainable_params" in jobs.columns and "ref_ppl_before" in jobs.columns
    assert pd.read_csv(sweep / "tables" / "jobs.csv").shape == jobs.shape


def test_every_output_exists_and_parses(sweep):
    assert main([str(sweep)]) == 0
    out = sweep / "tables"
    md = (out / "comparison.md").read_text()
    assert md.startswith("| strategy   |   seeds |") and md.count("\n") == 7  # header, rule, 5 rows
    assert "±" in md and "829,568" in md  # mean ± std; thousands separators
    assert "\\begin{tabular}" in (out / "comparison.tex").read_text()
    assert "<table" in (out / "comparison.html").read_text()
    for name in ("perplexity_vs_trainable", "gain_vs_forgetting", "validation_curves", "time_and_memory"):
        png = (out / f"{name}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_options_and_bad_input(sweep, tmp_path, capsys):
    assert (
        main(
            [
                str(sweep),
                "--group-by",
                "strategy",
                "--sort",
                "train_seconds",
                "--columns",
                "strategy,seeds,train_seconds",
            ]
        )
        == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert [c.strip() for c in lines[0].split("|")[1:4]] == ["strategy", "seeds", "train_seconds"]
    assert main([str(sweep), "--sort", "nope"]) == 2
    assert "unknown column 'nope'; allowed: sweep, job, strategy" in capsys.readouterr().err
    assert main([str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: sweep folder {str(tmp_path / 'missing')!r} does not exist"
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 2
    assert capsys.readouterr().err.strip().startswith("error: no job folders in")
    assert main(["--root", str(tmp_path / "nothing")]) == 2


def test_newest_sweep_by_default(sweep, tmp_path, monkeypatch, capsys):
    root = tmp_path / "multirun"
    (root / "2026-01-01" / "00-00-00").mkdir(parents=True)
    (root / "2026-01-02").mkdir()
    (root / "2026-01-02" / "00-00-00").symlink_to(sweep)
    monkeypatch.chdir(tmp_path)
    assert main([]) == 0  # the newest: 2026-01-02
    assert "7 jobs" in capsys.readouterr().out


def test_sweeps_that_vary_different_overrides_share_one_table(sweep, two_job_sweep, tmp_path, capsys):
    """strategy and seed vary in one sweep, optimizer.lr in the other: each row lacks the other's keys."""
    assert main([str(sweep), str(two_job_sweep), "--out", str(tmp_path)]) == 0
    assert "9 jobs (6 completed, 1 failed, 1 incomplete, 1 unreadable) from 2 sweep(s)" in capsys.readouterr().out
    table = pd.read_csv(tmp_path / "comparison.csv")
    completed = table[table["status"] == "completed"]
    assert sorted(completed["optimizer.lr"].dropna()) == [1e-4, 1e-3]
    assert completed["seeds"].tolist().count(2) == 2  # full and lora, over seeds 1 and 2
    assert len(list(tmp_path.glob("*.png"))) == 4


def test_jobs_scored_on_different_tokens_are_never_averaged():
    """Two seeds of one strategy, but one scored on the first 4,096 validation tokens (eval.max_tokens)."""
    jobs = pd.DataFrame({
        "sweep": ["a", "b"], "job": ["0", "0"], "strategy": ["full", "full"], "seed": [1, 2],
        "status": ["completed", "completed"], "error": [None, None], "val_ppl_after": [10.0, 20.0],
        "val_tokens": [4096, 22134],
    })  # fmt: skip
    jobs.attrs["override_keys"] = ["strategy", "seed"]
    table = comparison(jobs)
    assert table["val_tokens"].tolist() == [4096, 22134] and table["seeds"].tolist() == [1, 1]
    jobs["val_tokens"] = 4096
    assert comparison(jobs)["seeds"].tolist() == [2]


def test_notebook_runs_headless(sweep, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    path = Path(__file__).resolve().parent.parent / "notebooks" / "compare_strategies.ipynb"
    nb = nbformat.read(path, as_version=4)
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in nb.cells if c.cell_type == "code")
    monkeypatch.setenv("TRANSFER_SWEEP", str(sweep))
    NotebookClient(nb, timeout=300, kernel_name="python3").execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 4
    assert any("7 jobs" in o.get("text", "") and "'completed': 4" in o.get("text", "") for o in outputs)


def test_scale_benchmark_runs(tmp_path):
    import subprocess
    import sys

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "aggregate_scale.py"
    proc = subprocess.run([sys.executable, str(script), "--jobs", "48"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("48 jobs -> ") and "total" in proc.stdout
    assert not math.isnan(float(proc.stdout.split("total ")[1].split(" s")[0]))


def test_numbers_are_shown_to_significant_figures_never_as_zero():
    from transfer.aggregate import _formatter

    assert _formatter("train_seconds")(0.00123) == "0.00123" and _formatter("train_seconds")(12.34) == "12.3"
    assert _formatter("val_loss_after")(0.0000456) == "4.56e-05"
    assert _formatter("val_change_pct")(-0.0412) == "-0.0412" and _formatter("trainable_params")(1234567) == "1,234,567"
    assert _formatter("tokens_per_second")(83_456.7) == "83,457" and _formatter("peak_memory_mb")(3.21) == "3.21"


def test_a_speed_taken_on_shared_cpus_is_marked_contended(monkeypatch):
    """The record keeps CPU time and the load; the table says how many of a row's jobs shared the CPUs."""
    import os

    import torch

    from transfer.aggregate import for_people
    from transfer.hardware import MachineLoad

    cpus = len(os.sched_getaffinity(0))
    loads = iter([cpus - 0.2, cpus + 0.3, cpus + 2.0])
    monkeypatch.setattr(os, "getloadavg", lambda: (next(loads), 0.0, 0.0))
    quiet = MachineLoad()
    quiet.sample()
    assert quiet.summary()["contended"] is True  # the third sample: two more runnable tasks than CPUs
    loads = iter([cpus - 0.2, cpus + 0.3])
    summary = MachineLoad().summary()
    assert summary["contended"] is False and summary["load_average_max"] == cpus + 0.3 and summary["cpus"] == cpus
    assert summary["cpu_seconds"] >= 0 and summary["torch_threads"] == torch.get_num_threads()
    jobs = pd.DataFrame({
        "sweep": ["a"] * 4, "job": ["0", "1", "2", "3"], "strategy": ["full", "full", "lora", "lora"],
        "seed": [1, 2, 1, 2], "status": ["completed"] * 4, "error": [None] * 4, "tokens_per_second": [900.0, 100.0, 5.0, 6.0],
        "contended": [False, True, False, None],
    })  # fmt: skip
    jobs.attrs["override_keys"] = ["strategy", "seed"]
    table = comparison(jobs)
    assert table.set_index("strategy")["contended"].fillna("").to_dict() == {"full": "1 of 2", "lora": ""}
    assert "contended" in for_people(table).columns
    jobs["contended"] = False
    assert "contended" not in for_people(comparison(jobs)).columns

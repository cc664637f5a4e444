"""`make tables` on a real small sweep: rows, seed statistics, failures, files, plots, notebook."""

import json
import math
import os
import shutil
import statistics
from pathlib import Path

import pandas as pd
import pytest
from conftest import copy_run, run_cli, run_here

from transfer.aggregate.__main__ import main
from transfer.aggregate.jobs import find_sweeps, read_jobs, sweeps_under
from transfer.aggregate.stats import PairedTest, paired_t_test, t_cdf, t_quantile, t_two_sided_p
from transfer.aggregate.tables import CI_NOTE, comparison, for_people
from transfer.errors import TransferError

STEPS = ["max_steps=6", "eval_interval=3", "block_size=64", "micro_batch_size=4", "eval.max_tokens=2048", "eval.probes.python_docs.max_tokens=2048",
         "checkpoint.enabled=false", "eval.max_new_tokens=4", "hardware.estimate_memory=false"]  # fmt: skip


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """tiny, two strategies x two seeds; plus a job failed in the job, one without a record, one with a damaged record."""
    root = tmp_path_factory.mktemp("agg")
    proc = run_cli(["-m", "strategy=full,lora", "seed=1,2", *STEPS, "hydra.sweep.dir=sweep"], cwd=root, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep = root / "sweep"
    assert (sweep / "tables" / "comparison.md").is_file(), "the end-of-sweep callback wrote no tables"
    # a target that only the loaded model can refuse: the job fails, and says so in its record (run here: the command
    # line's exit status for it is test_reliability's job case)
    with pytest.raises(TransferError, match="'qkv' matches no linear projection"):
        run_here(["strategy=lora", "strategy.target_modules=[qkv]", *STEPS], sweep / "4")
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
            ("ref_python_docs_ppl_after", lambda r: r["eval"]["final"]["ref_python_docs"]["perplexity"]),
            ("ref_python_docs_change_pct", lambda r: r["eval"]["change_pct"]["ref_python_docs"]),
            ("train_seconds", lambda r: r["train"]["seconds"]),
            ("warmup_seconds", lambda r: r["train"]["warmup_seconds"]),
            ("steady_tokens_per_second", lambda r: r["train"]["tokens_per_second_after_first_step"]),
            ("trainable_params", lambda r: r["params"]["trainable"]),
        ]:
            values = [value(r) for r in mine]
            assert row[column] == pytest.approx(statistics.mean(values), rel=1e-12)
            assert row[f"{column}_std"] == pytest.approx(statistics.stdev(values), rel=1e-9, abs=1e-12)
            # two seeds: t_{0.975, 1} is the Cauchy quantile tan(0.475 pi)
            ci = math.tan(0.475 * math.pi) * statistics.stdev(values) / math.sqrt(2)
            assert row[f"{column}_ci95"] == pytest.approx(ci, rel=1e-9, abs=1e-12)
    failed = table[table["status"] == "failed"].iloc[0]
    assert "'qkv' matches no linear projection" in failed["error"]
    incomplete = table[table["status"] == "incomplete"].iloc[0]
    assert incomplete["strategy"] == "lora" and int(incomplete["job"]) == 5
    unreadable = table[table["status"] == "unreadable"].iloc[0]
    assert unreadable["strategy"] == "full" and int(unreadable["job"]) == 6
    assert unreadable["error"].startswith("metrics.json is unreadable (")
    # only strategy and seed vary: nothing to pick per strategy
    assert not list((sweep / "tables").glob("best_per_*"))
    shown = for_people(comparison(read_jobs([sweep])))
    assert {"test_ppl_before", "ref_python_docs_change_pct"} <= set(shown.columns)
    full = table[table["strategy"].eq("full") & table["status"].eq("completed")].index[0]
    mean, ci = table.at[full, "val_ppl_after"], table.at[full, "val_ppl_after_ci95"]
    assert shown.at[full, "val_ppl_after"] == f"{mean:.3g} ± {ci:.3g}"


def test_jobs_frame_has_override_columns_and_every_job(sweep):
    assert main([str(sweep)]) == 0
    jobs = pd.read_parquet(sweep / "tables" / "jobs.parquet")
    assert list(jobs.columns[:4]) == ["sweep", "job", "strategy", "seed"]
    assert len(jobs) == 7 and set(jobs["status"]) == {"completed", "failed", "incomplete", "unreadable"}
    assert {"max_steps", "trainable_params", "ref_python_docs_ppl_before"} <= set(jobs.columns)
    assert pd.read_csv(sweep / "tables" / "jobs.csv").shape == jobs.shape


def test_every_output_exists_and_parses(sweep):
    assert main([str(sweep)]) == 0
    out = sweep / "tables"
    md = (out / "comparison.md").read_text()
    assert md.startswith("| strategy   |   seeds |") and md.count("\n") == 9  # header, rule, 5 rows, gap, note
    assert "±" in md and "829,568" in md  # mean ± CI; thousands separators
    assert md.endswith(f"\n\n{CI_NOTE}\n")
    assert "\\begin{tabular}" in (out / "comparison.tex").read_text()
    assert "<table" in (out / "comparison.html").read_text()
    for name in ("perplexity_vs_trainable", "gain_vs_forgetting", "validation_curves", "time_and_memory",
                 "ci_val_ppl_after"):  # fmt: skip
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
    assert "unknown column 'nope'; allowed: strategy, seeds, trainable_params" in capsys.readouterr().err
    # columns of the jobs that the grouped table lacks: an error, not a column silently left out
    assert main([str(sweep), "--columns", "strategy,sweep,val_ppl_after"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown column 'sweep'; allowed: strategy, seeds,") and "\n" not in err
    allowed = err.split("; allowed: ")[1].split(", ")
    assert "job" in allowed and "val_ppl_after" in allowed  # job: the failed rows name theirs
    assert not [c for c in allowed if c.endswith(("_std", "_ci95", "_same_genre"))]
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
    """strategy and seed vary in one sweep, optimizer.lr in the other: each row holds the value its job ran with for
    the other's keys too, the first sweep's jobs the rate their strategy gave (optimizer.lr null)."""
    assert main([str(sweep), str(two_job_sweep), "--out", str(tmp_path)]) == 0
    assert "9 jobs (6 completed, 1 failed, 1 incomplete, 1 unreadable) from 2 sweeps" in capsys.readouterr().out
    table = pd.read_csv(tmp_path / "comparison.csv")
    completed = table[table["status"] == "completed"]
    assert {r["config"]["optimizer"]["lr"] for r in records(sweep)} == {None}
    rates = {r["choices"]["strategy"]: r["config"]["strategy"]["lr"] for r in records(sweep)}
    assert sorted(completed["optimizer.lr"]) == sorted([1e-4, 1e-3, rates["full"], rates["lora"]])
    assert completed["seeds"].tolist().count(2) == 2  # full and lora, over seeds 1 and 2
    pngs = {p.stem for p in tmp_path.glob("*.png")}
    mine = {"perplexity_vs_trainable", "gain_vs_forgetting", "validation_curves", "time_and_memory", "ci_val_ppl_after"}
    assert mine <= pngs and pngs - mine <= {"weight_change"}  # weight_change: drawn where the records keep one
    # the learning rate varies besides strategy: each strategy's best group on validation
    best = pd.read_csv(tmp_path / "best_per_strategy.csv").set_index("strategy")
    for strategy, candidates in completed.groupby("strategy"):
        winner = candidates.loc[candidates["val_ppl_after"].idxmin()]
        assert best.at[strategy, "val_ppl_after"] == winner["val_ppl_after"]
        assert best.at[strategy, "test_ppl_after"] == winner["test_ppl_after"]
        assert best.at[strategy, "candidates"] == len(candidates)


def test_a_copied_job_is_one_seed_and_a_metric_that_is_no_number_is_named(two_job_sweep, tmp_path, capsys):
    """`cp -r sweep/0 sweep/2`: one seed run once, found twice. And a record whose numbers include text and a list."""
    sweep = copy_run(two_job_sweep, tmp_path / "sweep")
    shutil.copytree(sweep / "0", sweep / "2")
    record = json.loads((sweep / "1" / "metrics.json").read_text())
    record["train"]["seconds"] = "12 s"
    record["eval"]["final"]["test"]["perplexity"] = [8.0]
    (sweep / "1" / "metrics.json").write_text(json.dumps(record))
    seed = record["config"]["seed"]
    notes = [
        f"{sweep / '1'}: train_seconds is '12 s' in its record, not a number; left out",
        f"{sweep / '1'}: test_ppl_after is [8.0] in its record, not a number; left out",
        f"{sweep / '2'} ran the same config and seed ({seed}) as {sweep / '0'}: counted once, not as a second seed",
    ]
    assert main([str(sweep)]) == 0
    printed = capsys.readouterr().out
    assert "3 jobs (2 completed, 1 duplicate) from 1 sweep" in printed
    assert "".join(f"\n- {note}" for note in notes) in printed
    md = (sweep / "tables" / "comparison.md").read_text()
    assert md.endswith(f"{CI_NOTE}\n\n" + "\n".join(f"- {note}" for note in notes) + "\n")
    table = pd.read_csv(sweep / "tables" / "comparison.csv")
    assert sorted(table["status"]) == ["completed", "completed", "duplicate"]
    counted = table[table["status"] == "completed"].set_index("optimizer.lr")
    assert counted["seeds"].to_dict() == {1e-4: 1, 1e-3: 1}
    copy = table[table["status"] == "duplicate"].iloc[0]
    assert copy["seeds"] == 0 and copy["job"] == 2 and copy["optimizer.lr"] == 1e-4
    assert copy["error"] == f"the same config and seed ({seed}) as {sweep / '0'}; counted there"
    first = json.loads((sweep / "0" / "metrics.json").read_text())
    assert counted.at[1e-4, "val_ppl_after"] == first["eval"]["final"]["validation"]["perplexity"]
    assert math.isnan(counted.at[1e-4, "val_ppl_after_std"])  # one seed: no spread, not a spread of 0 from a copy
    jobs = pd.read_csv(sweep / "tables" / "jobs.csv")
    assert math.isnan(jobs["train_seconds"][1]) and math.isnan(jobs["test_ppl_after"][1])
    assert jobs["val_ppl_after"][1] == record["eval"]["final"]["validation"]["perplexity"]  # the rest of it counts


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


def test_a_preference_table_shows_the_loss_beside_reward_accuracy(tmp_path):
    """A DPO run whose test reward accuracy rose to 0.6 while its test loss grew past the untrained log 2 (0.693): both
    in the table, validation and test, with what they mean under it. A language model's loss, the log of the
    perplexity the table shows, is not shown."""
    from transfer.aggregate.tables import PREFERENCE_NOTE, TASK_NOTE, under_table

    def record(objective, strategy, before, after):
        return {"status": "completed", "overrides": [f"objective={objective}", f"strategy={strategy}", "seed=1"],
                "choices": {"strategy": strategy, "model": "tiny", "dataset": "pairs"}, "config": {"seed": 1},
                "objective": {"name": objective}, "params": {"trainable": 10, "total": 20}, "train": {"seconds": 1.0},
                "eval": {"baseline": before, "final": after}}  # fmt: skip

    untrained = {"loss": 0.6931, "reward_accuracy": 0.5, "margin": 0.0}
    trained = {"validation": {"loss": 0.71, "reward_accuracy": 0.62, "margin": 0.1},
               "test": {"loss": 0.805, "reward_accuracy": 0.6, "margin": 0.05}}  # fmt: skip
    for i, r in enumerate([record("dpo", "lora", {"validation": untrained, "test": untrained}, trained),
                           record("dpo", "full", {"validation": untrained, "test": untrained}, trained)]):  # fmt: skip
        (tmp_path / "dpo" / str(i)).mkdir(parents=True)
        (tmp_path / "dpo" / str(i) / "metrics.json").write_text(json.dumps(r))
    table = comparison(read_jobs([tmp_path / "dpo"]))
    shown = for_people(table)
    cols = list(shown.columns)
    assert cols[cols.index("val_reward_accuracy_before") :][:4] == [
        "val_reward_accuracy_before", "val_reward_accuracy_after", "val_loss_before", "val_loss_after"
    ]  # fmt: skip
    assert cols[cols.index("test_reward_accuracy_after") :][:3] == [
        "test_reward_accuracy_after", "test_loss_before", "test_loss_after"
    ]  # fmt: skip
    assert shown.loc[0, ["test_reward_accuracy_after", "test_loss_before", "test_loss_after"]].tolist() == [
        "0.6", "0.693", "0.805"
    ]  # fmt: skip
    note = under_table(table, shown.columns)
    assert PREFERENCE_NOTE in note and TASK_NOTE not in note and CI_NOTE in note
    assert PREFERENCE_NOTE not in under_table(table, ["strategy", "val_reward_accuracy_after"])  # no loss shown

    lm = {"validation": {"loss": 2.0, "perplexity": 7.39}, "test": {"loss": 2.1, "perplexity": 8.17}}
    (tmp_path / "lm" / "0").mkdir(parents=True)
    (tmp_path / "lm" / "0" / "metrics.json").write_text(json.dumps(record("lm", "lora", lm, lm)))
    lm_table = comparison(read_jobs([tmp_path / "lm"]))
    assert "val_ppl_after" in for_people(lm_table) and not [c for c in for_people(lm_table) if "_loss_" in c]
    assert under_table(lm_table) == CI_NOTE


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
    from transfer.aggregate.plots import write_plots

    jobs = read_jobs([sweep])
    plots = write_plots(jobs, comparison(jobs), sweep / "tables")
    assert sum("image/png" in o.get("data", {}) for o in outputs) == len(plots) >= 5
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
    from transfer.aggregate.columns import formatter

    assert formatter("train_seconds")(0.00123) == "0.00123" and formatter("train_seconds")(12.34) == "12.3"
    assert formatter("val_loss_after")(0.0000456) == "4.56e-05"
    assert formatter("val_change_pct")(-0.0412) == "-0.0412" and formatter("trainable_params")(1234567) == "1,234,567"
    assert formatter("tokens_per_second")(83_456.7) == "83,457" and formatter("peak_memory_mb")(3.21) == "3.21"


def test_a_speed_taken_on_shared_cpus_is_marked_contended(monkeypatch):
    """The record keeps CPU time and the load; the table says how many of a row's jobs shared the CPUs."""
    import os

    import torch

    from transfer.aggregate.tables import for_people
    from transfer.training.hardware import MachineLoad

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


# ---------------------------------------------------------------- statistics, on records built by hand (fast)
def test_t_quantiles_match_the_published_table():
    for df, table_value in [(1, 12.706), (2, 4.303), (4, 2.776), (9, 2.262), (30, 2.042)]:
        assert t_quantile(0.975, df) == pytest.approx(table_value, abs=6e-4)
        assert t_quantile(0.025, df) == -t_quantile(0.975, df)


def test_t_cdf_matches_its_closed_forms():
    for t in (-40.0, -3.0, -0.5, 0.0, 0.7, 2.0, 12.7):
        assert t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-13)  # Cauchy
        assert t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-13)
        assert t_cdf(t, 1e7) == pytest.approx(0.5 * (1 + math.erf(t / math.sqrt(2))), abs=1e-6)  # the normal limit
        assert t_two_sided_p(t, 5) == pytest.approx(2 * t_cdf(-abs(t), 5), abs=1e-14)
    for df in (3, 7.5, 60):
        for q in (0.6, 0.9, 0.995):
            assert t_cdf(t_quantile(q, df), df) == pytest.approx(q, abs=1e-11)


def test_paired_t_test_against_its_formula():
    d = [1.0, 2.0, 3.0]  # mean 2, sd 1: t = 2 sqrt(3) on 2 degrees of freedom
    test, t = paired_t_test(d), 2 * math.sqrt(3)
    assert test.n == 3 and test.mean == 2.0
    assert test.p == pytest.approx(1 - t / math.sqrt(2 + t * t), rel=1e-12)  # df 2: P(|T| >= t) in closed form
    assert test.half_width == pytest.approx(t_quantile(0.975, 2) / math.sqrt(3), rel=1e-12)
    assert not test.significant and test.p > 0.05 and test.half_width > test.mean  # the interval holds 0
    assert paired_t_test([5.0, 5.1, 4.9]).significant
    one = paired_t_test([4.0])
    assert one.n == 1 and math.isnan(one.p) and math.isnan(one.half_width) and not one.significant


def test_values_equal_up_to_float_rounding_have_no_interval(tmp_path):
    """Three seeds' val_ppl_before of 7.58 each: their sum over 3 is 7.580000000000001, whose pandas std is 1.1e-15,
    and the table showed `7.58 ± 2.7e-15`; an interval of float noise in the markdown, the CSV and the plots' bars."""
    from transfer.aggregate.readable import interval

    for seed in (1, 2, 3):
        record = fake_record("full", "1e-3", seed, 10.0 + seed, 20.0)
        record["eval"]["baseline"]["validation"]["perplexity"] = 7.58
        (tmp_path / str(seed)).mkdir()
        (tmp_path / str(seed) / "metrics.json").write_text(json.dumps(record))
    table = comparison(read_jobs([tmp_path]))
    assert table.at[0, "val_ppl_before"] == pytest.approx(7.58, rel=1e-15)
    assert table.at[0, "val_ppl_before_std"] == 0.0 and table.at[0, "val_ppl_before_ci95"] == 0.0
    assert interval(table.iloc[0], "val_ppl_before") == (0.0, 0.0)
    shown = for_people(table)
    assert shown.at[0, "val_ppl_before"] == "7.58"
    assert shown.at[0, "val_ppl_after"] == f"12 ± {t_quantile(0.975, 2) / math.sqrt(3):.3g}"  # 11, 12, 13: a spread
    assert paired_t_test([0.1 + 0.2, 0.3, 0.3]) == PairedTest(3, pytest.approx(0.3), 0.0, 0.0)  # one difference


PROBES = {
    "ref_python_docs": {"genre": "prose", "same_genre_as_training": False, "format": "text"},
    "ref_rust": {"genre": "rust", "same_genre_as_training": True, "format": "text"},
}
# (strategy, lr) -> validation, test perplexity after, per seed 1, 2, 3. full's lr 1e-4 is worse on validation and
# better on test than 1e-3; lora at 1e-4 has two seeds.
VALUES = {
    ("full", "1e-3"): ([10.0, 11.0, 12.5], [20.0, 21.0, 22.5]),
    ("full", "1e-4"): ([12.0, 13.0, 14.5], [18.0, 19.0, 20.5]),
    ("lora", "1e-3"): ([11.0, 13.0, 15.5], [21.0, 23.0, 25.5]),
    ("lora", "1e-4"): ([17.0, 18.1], [27.0, 28.0]),
}


def fake_record(strategy: str, lr: str, seed: int, val: float, test: float, probes: bool = True) -> dict:
    """A record as run.py writes one: named forgetting probes (eval.probes), or the one reference corpus."""
    refs = {"ref_python_docs": (30.0, 30.0 + seed + val / 10), "ref_rust": (50.0, 45.0 - seed * val / 10)}
    if not probes:
        refs = {"reference": refs["ref_python_docs"]}
    before = {"validation": {"perplexity": 40.0}, "test": {"perplexity": 42.0}} | {
        k: {"perplexity": b} for k, (b, _) in refs.items()
    }
    after = {"validation": {"perplexity": val}, "test": {"perplexity": test}} | {
        k: {"perplexity": a} for k, (_, a) in refs.items()
    }
    return {
        "status": "completed", "overrides": [f"strategy={strategy}", f"optimizer.lr={lr}", f"seed={seed}"],
        "choices": {"strategy": strategy, "model": "tiny", "dataset": "rust_concepts"},
        "config": {"seed": seed, "optimizer": {"lr": float(lr)}}, "params": {"trainable": 10, "total": 20},
        "train": {"seconds": 1.0},
        "eval": {"baseline": before, "final": after, "probes": PROBES if probes else None,
                 "change_pct": {k: 100 * (after[k]["perplexity"] / before[k]["perplexity"] - 1) for k in before}},
    }  # fmt: skip


def write_sweep(folder: Path, probes: bool = True) -> list[dict]:
    records = [fake_record(s, lr, seed, v, t, probes) for (s, lr), (vals, tests) in VALUES.items()
               for seed, v, t in zip((1, 2, 3), vals, tests, strict=False)]  # fmt: skip
    for i, record in enumerate(records):
        (folder / str(i)).mkdir(parents=True)
        (folder / str(i) / "metrics.json").write_text(json.dumps(record))
    return records


@pytest.fixture(scope="module")
def probe_sweep(tmp_path_factory) -> Path:
    """strategy x lr x 3 seeds (11 jobs) with two forgetting probes, one in the training data's genre; no training."""
    sweep = tmp_path_factory.mktemp("probes") / "sweep"
    write_sweep(sweep)
    return sweep


def test_probes_old_and_new_records_give_their_columns(probe_sweep, tmp_path):
    jobs = read_jobs([probe_sweep])
    assert jobs.attrs["probes"] == PROBES
    record = fake_record("full", "1e-3", 1, 10.0, 20.0)
    row = jobs.iloc[0]
    for probe in PROBES:
        assert row[f"{probe}_ppl_before"] == record["eval"]["baseline"][probe]["perplexity"]
        assert row[f"{probe}_change_pct"] == record["eval"]["change_pct"][probe]
    assert jobs["ref_rust_same_genre"].all() and not jobs["ref_python_docs_same_genre"].any()
    table = comparison(jobs)
    shown = for_people(table)
    assert {"test_ppl_before", "ref_python_docs_change_pct", "ref_rust_change_pct"} <= set(shown.columns)
    assert list(shown.columns).index("test_ppl_before") < list(shown.columns).index("test_ppl_after")
    write_sweep(tmp_path / "old", probes=False)  # one reference corpus: split "reference", short "ref"
    old = read_jobs([tmp_path / "old"])
    assert {"ref_ppl_before", "ref_ppl_after", "ref_change_pct"} <= set(old.columns)
    assert "ref_change_pct" in for_people(comparison(old)).columns


def test_ci95_is_t_times_standard_error(probe_sweep):
    table = comparison(read_jobs([probe_sweep])).set_index(["strategy", "optimizer.lr"])
    for (strategy, lr), (vals, _) in VALUES.items():
        row, n = table.loc[(strategy, float(lr))], len(vals)
        assert row["seeds"] == n and row["val_ppl_after"] == pytest.approx(statistics.mean(vals), rel=1e-12)
        half = {2: math.tan(0.475 * math.pi), 3: 0.95 / math.sqrt(2 * 0.975 * 0.025)}[n]  # t_{0.975, n-1}, closed forms
        assert row["val_ppl_after_ci95"] == pytest.approx(half * statistics.stdev(vals) / math.sqrt(n), rel=1e-10)


def test_paired_differences_from_a_baseline(probe_sweep, tmp_path, capsys):
    assert main([str(probe_sweep), "--baseline", "strategy=full", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    paired = pd.read_csv(tmp_path / "paired.csv")
    assert paired[["strategy", "optimizer.lr", "pairs"]].values.tolist() == [["lora", 1e-3, 3], ["lora", 1e-4, 2]]
    for i, lr in enumerate(("1e-3", "1e-4")):  # lora against full at the same learning rate, seed by seed
        d = [a - b for a, b in zip(VALUES[("lora", lr)][0], VALUES[("full", lr)][0], strict=False)]
        n, mean, sd = len(d), statistics.mean(d), statistics.stdev(d)
        t = mean / (sd / math.sqrt(n))
        p = {2: 1 - 2 * math.atan(abs(t)) / math.pi, 3: 1 - abs(t) / math.sqrt(2 + t * t)}[n]  # df 1 and 2
        assert paired.at[i, "val_ppl_after_n"] == n
        assert paired.at[i, "val_ppl_after_diff"] == pytest.approx(mean, rel=1e-12)
        assert paired.at[i, "val_ppl_after_p"] == pytest.approx(p, rel=1e-9)
        assert paired.at[i, "val_ppl_after_ci95"] == pytest.approx(t_quantile(0.975, n - 1) * sd / math.sqrt(n))
    assert {"test_ppl_after_diff", "ref_python_docs_change_pct_diff", "ref_rust_change_pct_diff"} <= set(paired)
    md = (tmp_path / "paired.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| lora")]
    val = [line.split("|")[4] for line in rows]  # Δ val_ppl_after: 1, 2, 3 is not significant, 5, 5.1 is
    assert "n.s." in val[0] and "n.s." not in val[1] and "Δ: this row minus strategy=full" in md
    assert "paired:" in printed and rows[0] in printed
    # aggregated again without a baseline: that table is no longer this aggregation's, and goes
    (tmp_path / "notes.md").write_text("mine")
    assert main([str(probe_sweep), "--out", str(tmp_path)]) == 0
    assert not (tmp_path / "paired.md").exists() and not (tmp_path / "paired.csv").exists()
    assert f"removed {tmp_path / 'paired.csv'}: an earlier aggregation's" in capsys.readouterr().out
    assert (tmp_path / "notes.md").read_text() == "mine" and (tmp_path / "comparison.md").is_file()


def test_paired_with_one_pair_says_so_rather_than_a_p_value():
    jobs = pd.DataFrame({
        "sweep": ["a"] * 4, "job": list("0123"), "strategy": ["full", "full", "full", "lora"], "seed": [1, 2, 3, 2],
        "status": ["completed"] * 4, "error": [None] * 4, "val_ppl_after": [10.0, 11.0, 12.0, 14.0],
    })  # fmt: skip
    jobs.attrs["override_keys"] = ["strategy", "seed"]
    from transfer.aggregate.contrasts import paired, paired_for_people

    numbers = paired(jobs, comparison(jobs), "strategy=full")
    assert numbers.at[0, "pairs"] == 1 and numbers.at[0, "val_ppl_after_diff"] == 3.0
    assert math.isnan(numbers.at[0, "val_ppl_after_p"])
    assert paired_for_people(numbers).at[0, "Δ val_ppl_after"] == "+3 (1 pair: too few for an interval or a test)"


def test_aggregate_piped_into_a_reader_that_leaves_ends_quietly(probe_sweep, tmp_path):
    """`python -m transfer.aggregate SWEEP | head` ended in a BrokenPipeError traceback; its tables are written first."""
    import subprocess
    import sys

    read, write = os.pipe()
    os.close(read)  # the reader leaves before the first line
    command = [sys.executable, "-m", "transfer.aggregate", str(probe_sweep), "--out", str(tmp_path / "tables")]
    with os.fdopen(write, "w") as closed:
        proc = subprocess.run(command, stdout=closed, stderr=subprocess.PIPE, text=True, timeout=120)
    assert (proc.returncode, proc.stderr) == (1, "")
    assert (tmp_path / "tables" / "comparison.csv").is_file()


def test_bad_baselines_say_what_is_allowed(probe_sweep, tmp_path, capsys):
    assert main([str(probe_sweep), "--baseline", "strategy=nope", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --baseline 'strategy=nope': no completed group has strategy=nope; allowed values: full, lora"
    assert main([str(probe_sweep), "--baseline", "lr=1e-3", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "error: --baseline 'lr=1e-3': 'lr' is not a grouping key; allowed: strategy=full|lora; optimizer.lr=0.001|0.0001"
    )
    assert main([str(probe_sweep), "--best-per", "seed", "--out", str(tmp_path)]) == 2
    assert "'seed' is not a grouping key; allowed: strategy, optimizer.lr" in capsys.readouterr().err
    assert not (tmp_path / "paired.md").exists()


def test_best_per_strategy_selects_on_validation_and_reports_test(probe_sweep, tmp_path, capsys):
    assert main([str(probe_sweep), "--best-per", "strategy", "--out", str(tmp_path)]) == 0
    assert "best per strategy:" in capsys.readouterr().out
    best = pd.read_csv(tmp_path / "best_per_strategy.csv").set_index("strategy")
    for strategy in ("full", "lora"):
        groups = {lr: v for (s, lr), v in VALUES.items() if s == strategy}
        lr = min(groups, key=lambda k: statistics.mean(groups[k][0]))  # best mean validation perplexity
        assert best.at[strategy, "optimizer.lr"] == float(lr) and best.at[strategy, "candidates"] == 2
        assert best.at[strategy, "test_ppl_after"] == pytest.approx(statistics.mean(groups[lr][1]))
        assert best.at[strategy, "picked"] == f"optimizer.lr={float(lr)}"
    # full's best test perplexity is at 1e-4; it is never what picks
    assert best.at["full", "test_ppl_after"] > statistics.mean(VALUES[("full", "1e-4")][1])
    md = (tmp_path / "best_per_strategy.md").read_text()
    assert md.splitlines()[0].split("|")[1:6] == [" strategy   ", " picked             ", "   candidates ",
                                                  "   seeds ", " val_ppl_after   "]  # fmt: skip
    (tmp_path / "best_per_strategy.md").unlink()
    assert main([str(probe_sweep), "--out", str(tmp_path)]) == 0  # written unasked: lr varies besides strategy
    assert (tmp_path / "best_per_strategy.md").read_text() == md


def test_plots_draw_intervals_and_every_probe(probe_sweep, tmp_path, monkeypatch):
    from transfer.aggregate import plots

    figures = {}
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.setdefault(path.stem, fig) and path)
    jobs = read_jobs([probe_sweep])
    table = comparison(jobs)
    plots.write_plots(jobs, table, tmp_path)
    # the main metric: the mean with its 95 % interval, n in the label, in the table's order
    ax = figures["ci_val_ppl_after"].axes[0]
    for i, bars in enumerate(ax.containers):
        (x0, _), (x1, _) = bars.lines[2][0].get_segments()[0]
        assert (x1 - x0) / 2 == pytest.approx(table.at[i, "val_ppl_after_ci95"])
        assert (x0 + x1) / 2 == pytest.approx(table.at[i, "val_ppl_after"])
    assert [t.get_text() for t in ax.get_yticklabels()][-1] == "lora · lr=0.0001 (n = 2)"
    # gain against forgetting: a panel per probe; the one in the training data's genre hollow, and said why
    panels = {a.get_title(): a for a in figures["gain_vs_forgetting"].axes}
    assert set(panels) == {"probe: python_docs (prose, text)", "probe: rust (rust, text)"}
    for title, ax in panels.items():
        assert ax.get_ylabel().endswith("(above 0: forgetting; below 0: the probe improved too)")
        assert "better" not in ax.get_ylabel()
        faces = [c.lines[0].get_markerfacecolor() for c in ax.containers]
        legend = [t.get_text() for t in ax.get_legend().get_texts()]
        same = "rust" in title
        assert len(faces) == 4 and all((f == "none") == same for f in faces)
        assert (plots.SAME_GENRE in " ".join(legend)) == same
    plt = plots.plt
    for fig in figures.values():
        plt.close(fig)


def _aged(sweep: Path, seconds: float) -> Path:
    """Its records (and job folders) written `seconds` ago: how the newest sweep is told."""
    when = 1_700_000_000 - seconds
    for path in [*sweep.glob("*/metrics.json"), *sweep.iterdir()]:
        os.utime(path, (when, when))
    return sweep


def test_the_newest_sweep_is_found_by_its_records_and_tables_is_never_one(tmp_path, monkeypatch, capsys):
    """A dated sweep, a hydra.sweep.dir=multirun/lora_search one with its tables/, --all's multirun/tables/, and
    folders that hold no job: found by their records, newest by when those were written, not by name."""
    root = tmp_path / "multirun"
    dated = root / "2026-01-01" / "00-00-00"
    write_sweep(dated)
    write_sweep(root / "lora_search")
    (root / "lora_search" / "tables").mkdir()
    (root / "2026-01-02" / "00-00-00").mkdir(parents=True)  # made, no job ever wrote there
    (root / "tables" / "lm-rust_concepts").mkdir(parents=True)
    (root / "tables" / "lm-rust_concepts" / "comparison.md").write_text("an earlier --all's")
    monkeypatch.chdir(tmp_path)
    assert sweeps_under(Path("multirun")) == [Path("multirun/2026-01-01/00-00-00"), Path("multirun/lora_search")]
    _aged(dated, 60)
    _aged(root / "lora_search", 10)
    assert main([]) == 0
    assert capsys.readouterr().out.endswith("from 1 sweep; tables in multirun/lora_search/tables\n")
    _aged(dated, 0)  # a job of the dated sweep wrote its record last (resumed, say)
    assert find_sweeps([], False) == [Path("multirun/2026-01-01/00-00-00")]
    assert find_sweeps([], True) == [Path("multirun/lora_search"), Path("multirun/2026-01-01/00-00-00")]
    shutil.rmtree(dated.parent)
    shutil.rmtree(root / "lora_search")
    assert main([]) == 2
    assert (
        capsys.readouterr().err
        == "error: no sweep under 'multirun'; run a sweep first (python -m transfer -m ...) or name a folder\n"
    )


def _sft_sweep(folder: Path) -> None:
    """MovieLens as an sft objective scored by its choices (accuracy), two strategies."""
    for i, (strategy, accuracy) in enumerate((("full", 0.61), ("lora", 0.58))):
        record = fake_record(strategy, "1e-4", 1, 2.0, 2.1, probes=False)
        record.update(objective={"name": "sft", "select": "accuracy"},
                      choices={"strategy": strategy, "model": "tiny", "dataset": "movielens"})  # fmt: skip
        record["eval"]["final"]["validation"]["accuracy"] = accuracy
        record["eval"]["baseline"]["validation"]["accuracy"] = 0.5
        (folder / str(i)).mkdir(parents=True)
        (folder / str(i) / "metrics.json").write_text(json.dumps(record))


def test_a_task_measured_after_training_only_is_drawn_without_before_bars(tmp_path, monkeypatch):
    from transfer.aggregate import plots

    _sft_sweep(tmp_path / "sweep")
    for record_file in (tmp_path / "sweep").glob("*/metrics.json"):
        record = json.loads(record_file.read_text())
        del record["eval"]["baseline"]["validation"]["accuracy"]
        record_file.write_text(json.dumps(record))
    figures = {}
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.setdefault(path.stem, fig) and path)
    jobs = read_jobs([tmp_path / "sweep"])
    plots.write_plots(jobs, comparison(jobs), tmp_path / "tables")
    (ax,) = figures["task_metrics"].axes
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "after" in legend and "before training" not in legend
    assert [round(b.get_height(), 2) for b in ax.containers[0]] == [0.61, 0.58]
    for fig in figures.values():
        plots.plt.close(fig)


def test_all_never_mixes_sweeps_that_measure_different_things(tmp_path, monkeypatch, capsys):
    root = tmp_path / "multirun"
    write_sweep(root / "lm")
    _sft_sweep(root / "movielens")
    dry = fake_record("full", "1e-4", 1, 2.0, 2.1)
    dry.update(status="dry_run", eval={})
    dry["config"]["dry_run"] = True
    (root / "dry" / "0").mkdir(parents=True)
    (root / "dry" / "0" / "metrics.json").write_text(json.dumps(dry))
    monkeypatch.chdir(tmp_path)
    assert main(["--all"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(
        "3 sweeps measure 3 different things (objective and dataset; dry runs and sweeps with no finished job apart): "
        "a table for each, never one mixing them\n"
    )
    for kind, folder, jobs in (("lm on rust_concepts", "lm-rust_concepts", 11), ("sft on movielens", "sft-movielens", 2),
                               ("lm on rust_concepts (dry run)", "lm-rust_concepts-dry-run", 1)):  # fmt: skip
        assert f"## {kind}: 1 sweep" in printed
        out = Path("multirun/tables") / folder
        assert f"from 1 sweep; tables in {out}\n" in printed
        assert len(pd.read_csv(out / "jobs.csv")) == jobs
    assert set(pd.read_csv(root / "tables" / "sft-movielens" / "jobs.csv")["sweep"]) == {"multirun/movielens"}
    assert not (root / "lm" / "tables").exists()  # --all writes its own tables, never over a sweep's
    # named together without --all: refused, in one line that says why
    assert main(["multirun/lm", "multirun/movielens"]) == 2
    assert capsys.readouterr().err == (
        "error: these sweeps measure different things, which one table never mixes (lm on rust_concepts: multirun/lm; "
        "sft on movielens: multirun/movielens); allowed: sweeps of one objective and dataset, or --all, which writes "
        "a table per kind\n"
    )


def test_a_whole_number_key_prints_whole(tmp_path, capsys):
    """max_steps=2 in one sweep, unset in the other: the column holds floats, the tables say 2, not 2.0."""
    write_sweep(tmp_path / "a")
    for i, record in enumerate(write_sweep(tmp_path / "b")):
        record["overrides"].append("max_steps=2")
        record["config"]["max_steps"] = 2
        record["eval"]["final"]["validation"]["perplexity"] -= 1  # b's groups are the best
        (tmp_path / "b" / str(i) / "metrics.json").write_text(json.dumps(record))
    out = tmp_path / "tables"
    columns = ["--columns", "strategy,optimizer.lr,max_steps,seeds"]
    assert main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out), *columns]) == 0
    printed = capsys.readouterr().out
    rows = [line.split("|") for line in printed.splitlines() if line.startswith(("| full", "| lora"))]
    assert sorted(row[3].strip() for row in rows[:8]) == [""] * 4 + ["2"] * 4
    assert pd.read_csv(out / "comparison.csv")["max_steps"].dropna().tolist() == [2.0] * 4  # the CSV keeps numbers
    assert pd.read_csv(out / "best_per_strategy.csv")["picked"].tolist() == ["optimizer.lr=0.001, max_steps=2"] * 2
    assert "max_steps=2.0" not in printed


# a benchmark's change of accuracy in points and its paired standard error per strategy, seeds 1, 2, 3 (issue 27)
BENCH = {"full": ([4.0, 6.0, 1.0], [3.0, 3.2, 2.9]), "lora": ([3.0, 2.0, 3.0], [2.5, 2.6, 2.7])}


def bench_record(strategy: str, seed: int) -> dict:
    """A record as run.py writes one with eval.benchmarks: the harness's numbers, the items, the paired change."""
    change, stderr = BENCH[strategy][0][seed - 1], BENCH[strategy][1][seed - 1]
    items = {"per_item": {"acc": [0, 1]}, "harness": {"version": "0.4.13", "items": 100}}  # no columns of theirs
    before = {"validation": {"perplexity": 10.0}, "bench_arc_easy": {"acc": 0.24, "acc_stderr": 0.043, **items}}
    after = {"validation": {"perplexity": 6.0 + seed}, "bench_arc_easy": {
        "acc": 0.24 + change / 100, "acc_stderr": 0.044, **items,
        "acc_change_points": change, "acc_change_points_stderr": stderr}}  # fmt: skip
    return {"status": "completed", "overrides": [f"strategy={strategy}", f"seed={seed}"],
            "choices": {"strategy": strategy, "model": "tiny", "dataset": "rust_concepts"}, "config": {"seed": seed},
            "params": {"trainable": 10, "total": 20}, "train": {"seconds": 1.0},
            "eval": {"baseline": before, "final": after}}  # fmt: skip


def test_a_benchmark_change_shows_its_paired_standard_error_and_is_paired_across_seeds(tmp_path):
    """The comparison table shows each benchmark's change with its paired standard error beside it (± over seeds on
    the change only, which the note under it tells apart); the paired tests and best-per-strategy take the change like
    a probe's."""
    from transfer.aggregate.contrasts import best_per, paired, paired_for_people
    from transfer.aggregate.tables import BENCHMARK_NOTE, under_table

    for i, (strategy, seed) in enumerate((s, seed) for s in BENCH for seed in (1, 2, 3)):
        (tmp_path / str(i)).mkdir()
        (tmp_path / str(i) / "metrics.json").write_text(json.dumps(bench_record(strategy, seed)))
    jobs = read_jobs([tmp_path])
    change, stderr = "bench_arc_easy_acc_change_points_after", "bench_arc_easy_acc_change_points_stderr_after"
    table = comparison(jobs).set_index("strategy", drop=False)
    shown = for_people(table)
    bench = [c for c in shown.columns if c.startswith("bench_")]
    assert bench == ["bench_arc_easy_acc_before", "bench_arc_easy_acc_after", change, stderr]
    changes, errors = BENCH["full"]
    half = t_quantile(0.975, 2) * statistics.stdev(changes) / math.sqrt(3)
    assert shown.at["full", change] == f"+{statistics.mean(changes):.3g} ± {half:.3g}" == "+3.67 ± 6.25"
    assert shown.at["full", stderr] == f"{statistics.mean(errors):.3g}" == "3.03"  # no ± over seeds on an error
    assert BENCHMARK_NOTE in under_table(table, shown.columns) and CI_NOTE in under_table(table, shown.columns)
    one = for_people(comparison(jobs[jobs["seed"] == 1])).set_index("strategy")
    assert one.loc["full", [change, stderr]].tolist() == ["+4", "3"]
    assert BENCHMARK_NOTE not in under_table(table, ["strategy", "bench_arc_easy_acc_after"])

    numbers = paired(jobs, table.reset_index(drop=True), "strategy=full")
    d = [a - b for a, b in zip(BENCH["lora"][0], changes, strict=True)]  # -1, -4, +2: seed by seed
    t = statistics.mean(d) / (statistics.stdev(d) / math.sqrt(3))
    assert numbers.at[0, f"{change}_n"] == 3 and numbers.at[0, f"{change}_diff"] == pytest.approx(-1.0)
    assert numbers.at[0, f"{change}_p"] == pytest.approx(1 - abs(t) / math.sqrt(2 + t * t), rel=1e-9)  # df 2
    assert paired_for_people(numbers).at[0, f"Δ {change}"].startswith("-1 ± ")
    best = best_per(jobs, table.reset_index(drop=True), "strategy")
    assert best.attrs["shown"][-2:] == [change, stderr]


def test_markdown_tables_keep_the_sign_of_a_change_and_right_align_numbers():
    """tabulate reads `+16` back as 16: a forgetting probe's or a benchmark's change lost its sign in comparison.md."""
    from transfer.aggregate.tables import markdown

    cells = pd.DataFrame({"strategy": ["full", "lora"], "ref_change_pct": ["+16", "-3.5"], "n": ["1,024", ""]})
    lines = markdown(cells).splitlines()
    assert "+16" in lines[2] and "-3.5" in lines[3]
    rule = [cell.strip() for cell in lines[1].strip("|").split("|")]
    assert [cell.startswith(":") for cell in rule] == [True, False, False]  # left, right, right
    assert [cell.endswith(":") for cell in rule] == [False, True, True]

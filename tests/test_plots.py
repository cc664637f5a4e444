"""The plots as a reader meets them: named and rounded legends, intervals that stay where a quantity can be, plain
log-axis labels, a caption saying what one point is; and `python -m transfer.aggregate --help` without pandas.

Hand-made jobs frames, no training: each test draws in a fraction of a second."""

import math
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from transfer.aggregate import plots
from transfer.aggregate.readable import interval, labels, log_axis
from transfer.aggregate.tables import comparison

T_975_2 = 4.302652729749464  # Student t's 97.5 % quantile at 2 degrees of freedom (tables; not computed by stats.py)
LR = {0: 3.754553966912877e-05, 1: 1.2e-4}  # an Optuna search's draws: the legend printed them whole
SECONDS = {0: [1.0, 1.0, 30.0], 1: [5.0, 6.0, 7.0]}  # group 0's symmetric interval reaches far below 0 s


def _jobs() -> pd.DataFrame:
    """Two LoRA groups (lr, r) of three seeds: their validation curves, weight changes, times and perplexities."""
    rows = []
    for group in (0, 1):
        for seed in range(3):
            after = 6.7 + group + 0.1 * seed
            rows.append({
                "strategy": "lora", "optimizer.lr": LR[group], "strategy.r": 16 if group == 0 else 8, "seed": seed,
                "status": "completed", "train_seconds": SECONDS[group][seed], "peak_memory_mb": 700.0 + seed,
                "trainable_params": 1000 * (group + 1), "val_ppl_before": 9.7, "val_ppl_after": after,
                "val_change_pct": 100 * (after / 9.7 - 1), "weight_change": [0.01 * (group + 1), 0.02, 0.03],
                "validation_curve": [{"step": 10, "perplexity": 8.0 + group}, {"step": 20, "perplexity": after}],
            })  # fmt: skip
    jobs = pd.DataFrame(rows)
    jobs.attrs["override_keys"] = ["strategy", "optimizer.lr", "strategy.r", "seed"]
    return jobs


def title(fig) -> str:
    """A figure's title and caption, as one line (the caption is wrapped to the figure's width)."""
    return " ".join(fig._suptitle.get_text().split())


@pytest.fixture(scope="module")
def figures(tmp_path_factory) -> dict:
    """Every figure write_plots makes of _jobs(), by file name, drawn (tick labels set) and not saved."""
    drawn = {}

    def keep(fig, path):
        fig.canvas.draw()
        drawn[path.name] = fig
        return path

    jobs = _jobs()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(plots, "_save", keep)
        plots.write_plots(jobs, comparison(jobs), tmp_path_factory.mktemp("plots"))
    yield drawn
    for fig in drawn.values():
        plots.plt.close(fig)


def test_legends_name_their_keys_with_rounded_values_and_say_once_what_all_share(figures):
    (ax,) = figures["validation_curves.png"].axes
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["lr=3.8e-05 · r=16", "lr=0.00012 · r=8"]
    assert title(figures["validation_curves.png"]).endswith(". Same in all: strategy=lora")
    ticks = [t.get_text() for t in figures["time_and_memory.png"].axes[0].get_xticklabels()]
    assert ticks == ["lr=3.8e-05 · r=16", "lr=0.00012 · r=8"]  # the table's order: lower perplexity first


def test_labels_keep_apart_values_that_two_digits_would_merge():
    frame = pd.DataFrame({
        "strategy": ["lora", "dora", "lora"], "dataset.replay": [0.125, 0.12, math.nan], "search.trial": [0, 1, 2],
        "hardware": ["cpu", "cpu", "cpu"], "block_size": [512.0, 4096.0, 512.0],
    })  # fmt: skip
    rows, common = labels(frame, ["strategy", "dataset.replay", "search.trial", "hardware", "block_size"])
    assert rows == ["lora · replay=0.125 · trial 0 · block_size=512", "dora · replay=0.12 · trial 1 · block_size=4096",
                    "lora · trial 2 · block_size=512"]  # fmt: skip
    assert common == "hardware=cpu"


def test_an_interval_of_a_positive_quantity_never_reaches_below_zero(figures):
    """Group 0's times 1, 1, 30 s: mean ± t * s / sqrt(3) reaches -31 s; the bar stops at 0 and keeps its top."""
    mean, half = statistics.mean(SECONDS[0]), T_975_2 * statistics.stdev(SECONDS[0]) / math.sqrt(3)
    assert mean - half < -30
    time_axis = figures["time_and_memory.png"].axes[0]
    (bars,) = [c for c in time_axis.containers if hasattr(c, "errorbar")]
    (low, high), _ = (segment[:, 1] for segment in bars.errorbar.lines[2][0].get_segments())
    assert (low, high) == (0.0, pytest.approx(mean + half, rel=1e-9))
    assert "bars: 95 % t-interval of that mean (cut at 0: it is never negative)" in title(
        figures["time_and_memory.png"]
    )


def test_interval_is_cut_where_the_quantity_ends():
    assert interval({"val_accuracy_after": 0.9, "val_accuracy_after_ci95": 0.2}, "val_accuracy_after") == (
        pytest.approx(0.2),
        pytest.approx(0.1),
    )
    assert interval({"val_ppl_after": 1.5, "val_ppl_after_ci95": 1.0}, "val_ppl_after") == (0.5, 1.0)
    assert interval({"val_change_pct": -90.0, "val_change_pct_ci95": 30.0}, "val_change_pct") == (10.0, 30.0)
    assert interval({"val_margin_after": 0.1, "val_margin_after_ci95": 2.0}, "val_margin_after") == (2.0, 2.0)


def test_a_log_axis_within_a_decade_is_labelled_in_plain_numbers(figures):
    """Perplexity 9.7 to 6.7: round ticks, not matplotlib's 7×10^0 on minor steps."""
    (ax,) = figures["validation_curves.png"].axes
    assert ax.get_yscale() == "log"
    assert [t.get_text() for t in ax.get_yticklabels()] == ["7", "8", "9"]
    assert not [t.get_text() for t in ax.get_yticklabels(minor=True) if t.get_text()]


def test_a_log_axis_over_decades_has_plain_numbers_too():
    fig, ax = plots.plt.subplots()
    ax.plot([1, 2], [3.0, 40_000.0])
    log_axis(ax, "y")
    fig.canvas.draw()
    shown = [t.get_text() for t in ax.get_yticklabels() if ax.get_ylim()[0] <= t.get_position()[1] <= ax.get_ylim()[1]]
    plots.plt.close(fig)
    assert shown == ["10", "100", "1000", "10k"]


def test_every_plot_says_what_one_point_is(figures):
    assert set(figures) == {"perplexity_vs_trainable.png", "ci_val_ppl_after.png", "validation_curves.png",
                            "time_and_memory.png", "weight_change.png"}  # fmt: skip
    for name, fig in figures.items():
        assert re.search(
            r"one (point|line|bar|row): a group of jobs that differ only by seed, the mean over its seeds", title(fig)
        ), name


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_aggregate_help_prints_without_pandas_matplotlib_or_torch(flag):
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "transfer.aggregate", flag],
                          capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parent.parent)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("usage: python -m transfer.aggregate") and "--baseline KEY=VALUE" in proc.stdout
    imported = {line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert len(imported) > 10  # -X importtime did report
    assert not imported & {"pandas", "matplotlib", "numpy", "torch", "yaml"}


def test_a_plot_of_single_jobs_says_so_and_promises_no_interval():
    single, mixed = pd.DataFrame({"seeds": [1, 1]}), pd.DataFrame({"seeds": [3, 1]})
    assert plots._one(single, "point", "val_ppl_after") == ["one point: a job (one seed each, so no interval)"]
    assert plots._one(mixed, "bar", "train_seconds") == [
        "one bar: a group of jobs that differ only by seed, the mean over its seeds",
        "bars: 95 % t-interval of that mean (cut at 0: it is never negative)",
    ]


def test_the_gain_against_forgetting_plot_has_a_panel_per_benchmark_with_its_change_in_points(tmp_path):
    """A benchmark is forgotten like a probe (issue 27): its accuracy change, in points, against the domain gain."""
    jobs = _jobs()
    jobs["ref_python_docs_change_pct"] = [10.0, 11.0, 12.0, 20.0, 21.0, 22.0]
    jobs["bench_arc_easy_acc_change_points_after"] = [-2.0, -1.0, 0.0, -6.0, -5.0, -4.0]
    drawn = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(plots, "_save", lambda fig, path: drawn.setdefault(path.name, fig) and path)
        plots.write_plots(jobs, comparison(jobs), tmp_path)
    probe, bench = drawn["gain_vs_forgetting.png"].axes
    assert probe.get_title().startswith("probe: python_docs") and bench.get_title() == "benchmark: arc_easy"
    assert bench.get_ylabel().startswith("arc_easy accuracy change, points")
    means = sorted(bars.lines[0].get_ydata()[0] for bars in bench.containers)
    assert means == pytest.approx([-5.0, -1.0])  # each group's mean over its seeds
    plots.plt.close(drawn["gain_vs_forgetting.png"])

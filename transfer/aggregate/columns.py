"""What a column of the tables is called, which way it sorts, and how its numbers are written.

Every evaluation metric of every split gets a column `<split>_<metric>_<before|after>` (val_ppl_after,
test_auc_before) and each split its change `<split>_change_pct`; forgetting probes are the `ref_` splits, standard
benchmarks the `bench_` ones.
The direction of a metric is the objective table's (transfer.config.objective.DIRECTION).
"""

import math

import pandas as pd

from transfer.config.objective import DIRECTION

# the numbers of a run that are not evaluation metrics; those are read from the record by name
RUN_METRICS = [
    "trainable_params", "total_params", "trainable_pct", "train_seconds", "warmup_seconds", "tokens_per_second",
    "steady_tokens_per_second", "samples_per_second", "peak_memory_mb", "estimated_peak_mb", "checkpoint_mb",
    "best_step", "steps",
]  # fmt: skip
# what a split and a metric are called in a column: val_ppl_after, test_auc_before, ref_change_pct
SPLIT_SHORT = {"validation": "val", "test": "test", "reference": "ref"}
METRIC_SHORT = {"perplexity": "ppl"}
NOT_METRICS = ("tokens", "choice_examples")  # counts that say what was scored, kept in the record
EVALUATED = ("_before", "_after", "_change_pct")  # how an evaluation metric's column ends


def column(split: str, metric: str, suffix: str) -> str:
    """validation, perplexity, after -> val_ppl_after."""
    return f"{SPLIT_SHORT.get(split, split)}_{METRIC_SHORT.get(metric, metric)}_{suffix}"


def numeric(col: str) -> bool:
    """A column of numbers averaged over seeds: one of the run's numbers or an evaluation metric."""
    return col in RUN_METRICS or col.endswith(EVALUATED)


def metric_columns(frame: pd.DataFrame) -> list[str]:
    """The numeric result columns of a jobs frame: the run's numbers and every evaluation metric found."""
    evals = [c for c in frame.columns if c.endswith(EVALUATED)]
    return [c for c in [*RUN_METRICS, *evals] if c in frame.columns]


def probe_columns(frame: pd.DataFrame) -> list[str]:
    """The forgetting probes' change columns: `ref_change_pct` (one reference corpus) or `ref_<probe>_change_pct`."""
    return [c for c in frame.columns if c.startswith("ref_") and c.endswith("_change_pct")]


# a benchmark's change of accuracy in points, and its paired standard error over the items (evaluation/benchmarks.py)
CHANGE_POINTS, CHANGE_POINTS_STDERR = "_acc_change_points_after", "_acc_change_points_stderr_after"


def benchmark_columns(frame: pd.DataFrame) -> list[str]:
    """The benchmarks' accuracy before and after, its paired change in points and that change's standard error:
    `bench_<name>_acc_before`, `..._acc_after`, `..._acc_change_points_after`, `..._acc_change_points_stderr_after`,
    each benchmark's together."""
    ends = ("_acc_before", "_acc_after", CHANGE_POINTS, CHANGE_POINTS_STDERR)
    found = [c for c in frame.columns if c.startswith("bench_") and c.endswith(ends)]
    return sorted(found, key=lambda c: next((c.removesuffix(e), i) for i, e in enumerate(ends) if c.endswith(e)))


def benchmark_changes(frame: pd.DataFrame) -> list[str]:
    """The benchmarks' forgetting columns, as probe_columns are the probes': `bench_<name>_acc_change_points_after`."""
    return [c for c in frame.columns if c.startswith("bench_") and c.endswith(CHANGE_POINTS)]


def probe_name(change_column: str) -> str:
    """A probe's record key from its change column: ref_python_docs_change_pct -> ref_python_docs; ref_change_pct -> ref."""
    return change_column.removesuffix("_change_pct")


def lower_is_better(col: str) -> bool:
    """How a column sorts: a perplexity, loss or log-loss falls, an accuracy or AUC rises; counts and times fall."""
    for metric, direction in DIRECTION.items():
        if f"_{METRIC_SHORT.get(metric, metric)}_" in f"_{col}":
            return direction == "min"
    return True


def default_sort(jobs: pd.DataFrame) -> str:
    """The validation metric the jobs kept their best weights by, when they share one; else validation perplexity.

    Preference objectives' losses are on different scales: a sweep over them sorts by reward accuracy.
    """
    objectives = jobs["objective"].dropna().unique() if "objective" in jobs else []
    if len(objectives) > 1 and "val_reward_accuracy_after" in jobs:
        return "val_reward_accuracy_after"
    chosen = jobs["select"].dropna().unique() if "select" in jobs else []
    if len(chosen) == 1:
        selected = column("validation", chosen[0], "after")
        if selected in jobs:
            return selected
    return "val_ppl_after"


def main_metric(jobs: pd.DataFrame) -> str:
    """The validation metric a sweep is judged by: default_sort's, with perplexity for loss (the same
    ranking of a job, in the unit the tables show)."""
    select = default_sort(jobs)
    filled = "val_ppl_after" in jobs and jobs["val_ppl_after"].notna().any()
    return "val_ppl_after" if select == "val_loss_after" and filled else select


def formatter(col: str):
    """Counts whole, everything else to three significant figures: a time or a loss never shows as 0.00."""
    if col in ("trainable_params", "total_params", "steps", "best_step"):
        return lambda v: f"{v:,.0f}"
    if col.endswith("_pct"):
        return lambda v: f"{v:+.3g}" if "change" in col else f"{v:.3g}"
    if col.endswith(CHANGE_POINTS):
        return lambda v: f"{v:+.3g}"
    if col.endswith(("tokens_per_second", "samples_per_second", "_seconds", "_mb")):
        return lambda v: f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}"
    return lambda v: f"{v:.3g}"  # perplexities, losses, accuracies


def key_text(value) -> str:
    """A grouping key's value for people: empty when unset, a whole number without `.0` (max_steps=2, not 2.0: a
    column that some job leaves unset is held as floats)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)

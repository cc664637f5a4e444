"""The comparison table: jobs that differ only by seed grouped into one row, and its form for people.

A row holds the mean ± the half-width of its 95 % Student-t confidence interval, with the number of seeds (the
CSV keeps the standard deviation too). Failed jobs stay in the table with their status. Forgetting is measured on
probes: old records have one reference corpus (split `reference`, columns `ref_ppl_before`, `ref_change_pct`),
newer ones several named probes (`ref_<probe>`, columns `ref_<probe>_ppl_before`, `ref_<probe>_change_pct`).
A standard benchmark's change in points (`bench_<name>_acc_change_points_after`) has its paired standard error over
the items beside it, a column of its own: the ± of a table is over seeds, a different uncertainty (BENCHMARK_NOTE).
"""

import math
import re

import pandas as pd

from transfer.aggregate.columns import (
    benchmark_columns,
    default_sort,
    formatter,
    key_text,
    lower_is_better,
    metric_columns,
    numeric,
    probe_columns,
)
from transfer.aggregate.stats import ci95_half_width, sample_std
from transfer.errors import TransferError
from transfer.record import FINISHED


def comparison(jobs: pd.DataFrame, group_by: list[str] | None = None, sort: str | None = None) -> pd.DataFrame:
    """Jobs that differ only by seed, grouped: the seed count, and of every metric the mean, the std
    (`<m>_std`) and the half-width of the mean's 95 % Student-t confidence interval (`<m>_ci95`); both 0 where the
    seeds' values are equal up to float rounding (stats.sample_std), NaN for one seed.

    Completed runs and dry runs are grouped apart (a dry run has counts, no perplexities).
    """
    keys = group_by or default_group_keys(jobs)
    sort = sort or default_sort(jobs)
    done = jobs[jobs["status"].isin(FINISHED)]
    metrics = metric_columns(jobs)
    rows = []
    for key, group in done.groupby([*keys, "status"], dropna=False, sort=False):
        *key_values, status = key
        row = dict(zip(keys, key_values, strict=True))
        row["seeds"] = len(group)
        for m in metrics:
            values = pd.to_numeric(group[m], errors="coerce").dropna()
            row[m] = values.mean() if len(values) else math.nan
            row[f"{m}_std"] = sample_std(values)
            row[f"{m}_ci95"] = ci95_half_width(row[f"{m}_std"], len(values))
        for flag in [c for c in group.columns if c.endswith("_same_genre")]:
            row[flag] = bool(group[flag].eq(True).any())
        shared = int(group["contended"].eq(True).sum()) if "contended" in group else 0
        row["contended"] = f"{shared} of {len(group)}" if shared else None  # shown when a speed was taken so
        row["status"] = status
        row["error"] = None
        rows.append(row)
    for _, job in jobs[~jobs["status"].isin(FINISHED)].iterrows():  # failures stay visible
        row = {k: job.get(k) for k in keys}
        row.update(seeds=0, status=job["status"], error=job.get("error"), job=job["job"])
        rows.append(row)
    table = pd.DataFrame(rows)
    if sort in table.columns:
        table = table.sort_values(sort, ascending=lower_is_better(sort), na_position="last", kind="stable")
    table = table.reset_index(drop=True)
    table.attrs.update(
        group_keys=keys, sort=sort, probes=jobs.attrs.get("probes", {}), notes=jobs.attrs.get("notes", [])
    )
    return table


def default_group_keys(jobs: pd.DataFrame) -> list[str]:
    """The settings some job was given whose values vary across the jobs with results, seed excepted; strategy when
    nothing varies.

    Each job's value is the one it ran with (jobs.read_jobs), so a setting one sweep spelt out and another took from
    a preset, with one value everywhere, does not vary. A preset's name (+experiment=...) is a key only where it
    tells apart jobs that ran different configs which the other keys leave together. Jobs scored on different
    validation tokens (eval.max_tokens, set by a preset, say) are never averaged together: val_tokens joins the keys
    when it varies.
    """
    # among the jobs with results: a failed or unreadable job's missing overrides do not make a column vary
    done = jobs[jobs["status"].isin(FINISHED)]
    done = jobs if done.empty else done
    keys = [k for k in jobs.attrs.get("override_keys", []) if k != "seed" and _varies(done[k])]
    if "strategy" not in keys and "strategy" in jobs.columns:
        keys = ["strategy", *keys]
    if "val_tokens" in jobs.columns and jobs["val_tokens"].nunique() > 1:
        keys.append("val_tokens")
    for key in [k for k in keys if k in jobs.attrs.get("presets", ())]:  # a setting's column always stays
        if not _tells_configs_apart(done, key, [k for k in keys if k != key]):
            keys.remove(key)
    return keys


def _varies(values: pd.Series) -> bool:
    return values.map(key_text).nunique() > 1  # unset, missing and null alike; 2 and 2.0 one value


def _tells_configs_apart(done: pd.DataFrame, key: str, others: list[str]) -> bool:
    """Whether jobs that the other keys group together but `key` (a preset's name) tells apart ran different configs
    (config_id; a job without one may have): only where the preset set something that no key shows."""
    if "config_id" not in done:  # a frame made by hand, not read from records
        return True
    groups = done.groupby(others, dropna=False, sort=False) if others else [(None, done)]
    return any(
        _varies(group[key]) and (group["config_id"].isna().any() or group["config_id"].nunique() > 1)
        for _, group in groups
    )


# The comparison table's columns after the grouping keys, when none are asked for; PROBES stands for
# every forgetting probe's change column (ref_change_pct, or ref_<probe>_change_pct each), BENCHMARKS for every
# benchmark's accuracy before and after, its change in points and that change's paired standard error
# (bench_<name>_acc_...).
PROBES, BENCHMARKS = "<probes>", "<benchmarks>"
DEFAULT_COLUMNS = [
    "seeds", "trainable_params", "total_params", "trainable_pct", "val_ppl_before", "val_ppl_after",
    "val_change_pct", "val_auc_before", "val_auc_after", "val_accuracy_after", "val_majority_accuracy_after",
    "val_max_predicted_share_after", "val_log_loss_after",
    "val_reward_accuracy_before", "val_reward_accuracy_after", "val_loss_before", "val_loss_after", "val_margin_after",
    "val_token_kl_after", "test_ppl_before", "test_ppl_after", "test_auc_after", "test_accuracy_after",
    "test_majority_accuracy_after", "test_max_predicted_share_after", "test_reward_accuracy_after", "test_loss_before",
    "test_loss_after", "ref_ppl_before", "ref_ppl_after", PROBES, BENCHMARKS,
    "train_seconds", "warmup_seconds", "tokens_per_second", "steady_tokens_per_second", "contended", "peak_memory_mb",
    "estimated_peak_mb", "checkpoint_mb", "best_step", "status", "error",
]  # fmt: skip
# Default columns shown only beside another: a preference objective's loss beside its reward accuracy (a language
# model's or an sft run's loss is the log of the perplexity the table shows).
ONLY_BESIDE = {f"{split}_loss_{when}": f"{split}_reward_accuracy_after"
               for split in ("val", "test") for when in ("before", "after")}  # fmt: skip
# What the task columns mean; said under a table that shows them.
TASK_NOTE = (
    "`majority_accuracy` is the accuracy of always giving the split's most frequent answer (the record keeps every "
    "constant answer's, `constant_accuracy`); `max_predicted_share` is the largest share of the split's examples "
    "the model gives one and the same answer (1: every one; the record's `predicted_share` says which). An accuracy "
    "at the majority accuracy with a share near 1 is a model that learned the prior, not the task."
)
PREFERENCE_NOTE = (
    "`reward_accuracy` counts the pairs whose chosen answer gets the higher reward, `loss` is the objective's own on "
    "the same pairs (DPO's untrained loss is log 2 = 0.693): the accuracy can rise while the loss grows, when the "
    "pairs still ordered wrong are ordered far more wrong."
)
# What a benchmark's change and its standard error mean, and which error is which; said under a table showing them.
BENCHMARK_NOTE = (
    "`bench_<name>_acc_change_points_after` is the change of the benchmark's accuracy in points (after - before, "
    "x 100) on the same items; `_stderr_after` beside it is that change's paired standard error over the items (of "
    "the mean per-item difference: how far another draw of items could move it; with several seeds, the mean of "
    "theirs, shown without ±). The ± on the change itself is the 95 % confidence interval over seeds; with one seed "
    "the standard error is the only uncertainty shown."
)
# What ± means in every table that shows it; printed and written under them.
CI_NOTE = (
    "± is the half-width of the 95 % confidence interval of the mean over seeds "
    "(Student t, n - 1 degrees of freedom, n = seeds); a value without ± had one seed or no spread."
)
_HELPERS = ("_std", "_ci95", "_same_genre")  # columns behind a shown one, in the CSV only


def for_people(table: pd.DataFrame, columns: list[str] | None = None) -> pd.DataFrame:
    """Formatted strings: thousands separators, 3 significant figures, mean ± 95 % CI half-width (CI_NOTE).

    By default the grouping keys and DEFAULT_COLUMNS, less the columns no row fills
    (a dry-run sweep has counts but no perplexities; a sweep without failures no errors).
    A column asked for that the table lacks is an error, not left out.
    """
    if columns is None:
        columns = [*table.attrs.get("group_keys", []), *default_columns(table)]
    else:
        check_columns(columns, shown_columns(table), "column")
    out = pd.DataFrame(index=table.index)
    for col in dict.fromkeys(columns):
        if numeric(col):
            ci = table[f"{col}_ci95"] if f"{col}_ci95" in table else pd.Series(math.nan, index=table.index)
            out[col] = [_cell(v, ci[i], col) for i, v in table[col].items()]
        else:
            out[col] = table[col].map(key_text)
    return out


def markdown(cells: pd.DataFrame) -> str:
    """Written cells (for_people, a contrast table) as a Markdown table, each cell exactly as written: tabulate would
    read `+4` back as the number 4 and drop the sign a change needs. Columns of numbers are right-aligned."""
    number = lambda v: v in ("", None) or _NUMBER.fullmatch(str(v)) is not None  # noqa: E731
    align = ["right" if all(number(v) for v in cells[c]) else "left" for c in cells.columns]
    return cells.to_markdown(index=False, disable_numparse=True, colalign=align)


_NUMBER = re.compile(r"[+-]?[\d,]*\.?\d+(e[+-]?\d+)?|nan")


def default_columns(table: pd.DataFrame) -> list[str]:
    """DEFAULT_COLUMNS with the probes' change columns and the benchmarks' in place, less those no row fills."""
    placed = {PROBES: probe_columns(table), BENCHMARKS: benchmark_columns(table)}
    wanted = [c for name in DEFAULT_COLUMNS for c in placed.get(name, [name])]
    filled = lambda c: c in table and table[c].notna().any()  # noqa: E731
    return [c for c in dict.fromkeys(wanted)
            if c in ("seeds", "status") or (filled(c) and filled(ONLY_BESIDE.get(c, c)))]  # fmt: skip


def shown_columns(table: pd.DataFrame) -> list[str]:
    """The columns of a table that can be shown: every one but the std, CI and flag behind a shown one."""
    return [c for c in table.columns if not c.endswith(_HELPERS)]


def check_columns(asked: list[str], allowed: list[str], what: str) -> None:
    """One line naming the first column asked for that is not there, and the ones that are."""
    for col in asked:
        if col not in allowed:
            raise TransferError(f"unknown {what} {col!r}; allowed: {', '.join(allowed)}")


def _cell(value, ci, col: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    fmt = formatter(col)
    # one seed, or a value no seed changes; a standard error's spread over seeds says nothing a reader needs
    if ci is None or math.isnan(ci) or ci == 0 or "_stderr_" in col:
        return fmt(value)
    return f"{fmt(value)} ± {formatter(col.replace('change_', ''))(ci)}"


def under_table(table: pd.DataFrame, shown=None) -> str:
    """What the comparison table's ± means, what its task, preference and benchmark columns mean where `shown` (its
    columns as printed; by default the default ones) has them, and the notes of its reading (a duplicated job, a metric
    left out)."""
    shown = list(shown) if shown is not None else default_columns(table)
    meaning = [CI_NOTE]
    if any(c.endswith(("_majority_accuracy_after", "_max_predicted_share_after")) for c in shown):
        meaning.append(TASK_NOTE)
    if any("_reward_accuracy_" in c for c in shown) and any(c in ONLY_BESIDE for c in shown):
        meaning.append(PREFERENCE_NOTE)
    if any(c.startswith("bench_") and "_change_points_" in c for c in shown):
        meaning.append(BENCHMARK_NOTE)
    notes = table.attrs.get("notes") or []
    return " ".join(meaning) + ("\n\n" + "\n".join(f"- {note}" for note in notes) if notes else "")

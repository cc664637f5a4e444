"""Comparison tables and plots from sweep output: `python -m transfer.aggregate [SWEEP ...]`.

Each job folder of a sweep (`multirun/<date>/<time>/<job>/`) becomes one row of a
pandas DataFrame: its overrides as columns, then what its `metrics.json` says. Jobs
that differ only by seed are grouped into one row of the comparison table: the mean ± the
half-width of its 95 % Student-t confidence interval, with the number of seeds (the CSV keeps
the standard deviation too). Failed jobs and folders without a finished record stay in the
tables with their status; nothing is dropped silently. A record that says finished without what a
finished job writes is `unreadable`; a job that ran the config and seed of another (a copied folder,
a sweep run twice) is `duplicate` and counted once; a metric that is no number is left out. The last
two are said in notes under the table and on the terminal. Trials that an Optuna search pruned
show as `pruned`, with the metrics they had when they stopped.

Forgetting is measured on probes: old records have one reference corpus (split `reference`,
columns `ref_ppl_before`, `ref_change_pct`), newer ones several named probes (`ref_<probe>`,
columns `ref_<probe>_ppl_before`, `ref_<probe>_change_pct`) described in `eval.probes`.

`--baseline strategy=full` adds the other groups' differences from that group, paired by
seed, with a 95 % interval and a paired t-test (paired.{md,csv}); `--best-per strategy`, the
hyper-parameters each strategy does best with on validation, and their test metrics
(best_per_<key>.{md,csv}, written for strategy whenever a sweep varies more than strategy and seed).

Written into `<sweep>/tables/`: comparison.{md,csv,tex,html}, jobs.{csv,parquet} and
the plots (PNG). A multirun calls this by itself at its end (transfer.sweep.callbacks.TablesCallback).
"""

import argparse
import json
import logging
import math
import os
import reprlib
import shutil
import sys
import tempfile
from pathlib import Path

import pandas as pd
import yaml

from transfer.aggregate.stats import ci95_half_width
from transfer.errors import TransferError, reason
from transfer.evaluation import DIRECTION
from transfer.record import FINISHED, job_folders, lookup, missing_fields, read_record

log = logging.getLogger(__name__)
_MISSING = object()  # a key a config lacks, apart from one set to null
DEFAULT_ROOT = Path("multirun")
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
DESCRIPTIVE = ["strategy", "model", "dataset", "seed", "tied_embeddings", "stop_reason", "status", "error"]


# ---------------------------------------------------------------- reading
def find_sweeps(paths: list[str], all_sweeps: bool, root: Path = DEFAULT_ROOT) -> list[Path]:
    """The sweep folders to read: those given, every one under root, or the newest."""
    if paths:
        sweeps = [Path(p) for p in paths]
        for s in sweeps:
            if s.is_file():
                raise TransferError(
                    f"{str(s)!r} is a file; allowed: a sweep folder (multirun/<date>/<time>), which holds the jobs' folders"
                )
            if not s.is_dir():
                raise TransferError(f"sweep folder {str(s)!r} does not exist")
        return sweeps
    candidates = sorted(p for p in root.glob("*/*") if p.is_dir()) if root.is_dir() else []
    if not candidates:
        raise TransferError(
            f"no sweep under {str(root)!r}; run a sweep first (python -m transfer -m ...) or name a folder"
        )
    return candidates if all_sweeps else candidates[-1:]


def read_jobs(sweeps: list[Path]) -> pd.DataFrame:
    """One row per job of every sweep: override columns first, then the record's numbers."""
    rows = [job_row(sweep, job) for sweep in sweeps for job in job_folders(sweep)]
    if not rows:
        raise TransferError(f"no job folders in {', '.join(str(s) for s in sweeps)}; is it a sweep folder?")
    probes = {}
    for row in rows:  # what each probe is, for the plots' labels: the first record that says wins
        for name, about in (row.pop("_probes", None) or {}).items():
            probes.setdefault(name, about)
    # what the tables leave out or count once, said under them and on the terminal (main, TablesCallback)
    notes = [note for row in rows for note in row.pop("_notes", [])] + mark_duplicates(rows)
    frame = pd.DataFrame(rows)
    keys = dict.fromkeys(k for row in rows for k in row.pop("_override_keys"))
    frame = frame.drop(columns="_override_keys")
    frame.attrs["override_keys"] = list(keys)
    frame.attrs["probes"] = probes
    frame.attrs["notes"] = notes
    # override columns first, in the order they were given
    return frame[
        [
            "sweep",
            "job",
            *[k for k in keys if k not in ("sweep", "job")],
            *[c for c in frame.columns if c not in keys and c not in ("sweep", "job")],
        ]
    ]


def job_row(sweep: Path, job: Path) -> dict:
    try:
        record = read_record(job)
    except ValueError as e:  # not JSON: the job stays in the table, marked, and the others are read
        record = {"status": "unreadable", "error": f"metrics.json is unreadable ({str(e).splitlines()[0]})"}
    row = _job_record_row(sweep, job, record)
    # The overrides the job ran with, as its record keeps them: Hydra rewrites .hydra/overrides.yaml
    # whenever a sweep is launched again over the folder, even for jobs it then skips.
    overrides = _overrides(record.get("overrides") if record and "overrides" in record else _hydra_overrides(job))
    config = (record or {}).get("config") or {}
    for key, value in overrides.items():
        # the record's typed value wins over the override's text: 1e-4 and 0.0001, true and True are one value
        row.setdefault(key, _config_value(config, key, value))
    row["_override_keys"] = list(overrides)
    return row


def _job_record_row(sweep: Path, job: Path, record: dict | None) -> dict:
    row = {"sweep": str(sweep), "job": job.name}
    if record is not None and record.get("status") == "unreadable":
        return {**row, **record, **_choices(job, None)}
    if record is None or record.get("status") in (None, "running"):
        row.update(status="incomplete", error="no finished record (killed or still running)")
        return {**row, **_choices(job, record)}
    missing = missing_fields(record)
    if missing:  # says it finished, holds nothing a finished job writes: not a result to count
        row.update(status="unreadable", error=f"metrics.json says {record['status']} but has no {', '.join(missing)}")
        return {**row, **_choices(job, None)}  # from Hydra's files: the record's may be as damaged as the rest
    cfg = record.get("config", {})
    params = record.get("params", {})
    train = record.get("train", {})
    ev = record.get("eval", {})
    row.update(_choices(job, record))
    row.update(
        seed=cfg.get("seed"),
        status=record.get("status"),
        error=record.get("error"),
        tied_embeddings=params.get("tied_embeddings"),
        trainable_params=params.get("trainable"),
        total_params=params.get("total"),
        trainable_pct=params.get("trainable_pct"),
        train_seconds=train.get("seconds"),
        warmup_seconds=train.get("warmup_seconds"),  # of train_seconds: first steps, compiling included
        tokens_per_second=train.get("tokens_per_second"),
        # without each process's first step: the pace a compiled run keeps once compiled
        steady_tokens_per_second=train.get("tokens_per_second_after_first_step"),
        contended=(train.get("machine") or {}).get("contended"),  # the run shared the CPUs: its speed says less
        samples_per_second=train.get("samples_per_second"),
        steps=train.get("steps"),
        best_step=train.get("best_step"),
        stop_reason=train.get("stop_reason"),
        objective=(record.get("objective") or {}).get("name"),
        select=(record.get("objective") or {}).get("select"),
        peak_memory_mb=_mb(record.get("memory", {}).get("bytes")),
        estimated_peak_mb=_mb((record.get("memory_estimate") or {}).get("peak_bytes")),
        checkpoint_mb=_mb((train.get("checkpoint") or {}).get("bytes")),
        val_tokens=(record.get("data") or {}).get("validation", {}).get("tokens"),  # eval.max_tokens cuts it
    )
    row.update(eval_columns(ev))
    row.update(same_genre_columns(ev.get("probes")))
    row["_probes"] = ev.get("probes") or {}
    row["validation_curve"] = train.get("validation_curve") or []
    row["weight_change"] = lookup(record, "diagnostics.weight_change.blocks") or []  # per block, like the curve a list
    if record.get("status") == "pruned" and not (ev.get("final") or {}).get("validation") and row["validation_curve"]:
        # stopped before its final evaluation: its last validation is what it reached
        last = row["validation_curve"][-1]
        row.update({_column("validation", k, "after"): v for k, v in last.items()
                    if k != "step" and k not in NOT_METRICS and isinstance(v, (int, float))})  # fmt: skip
    row["_notes"] = _drop_non_numbers(row, job)
    # what makes two jobs one result: their config groups and whole config, seed included (resume=true continues
    # the same run)
    same = [record.get("choices"), {k: v for k, v in cfg.items() if k != "resume"}]
    row["_same_as"] = json.dumps(same, sort_keys=True, default=str)
    return row


def _drop_non_numbers(row: dict, job: Path) -> list[str]:
    """A metric the record holds as text, a list or true/false is left out of the averages: one note for each."""
    notes = []
    for column, value in row.items():
        numeric = (
            column in RUN_METRICS or column == "val_tokens" or column.endswith(("_before", "_after", "_change_pct"))
        )
        if numeric and value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            row[column] = None
            notes.append(f"{job}: {column} is {reprlib.repr(value)} in its record, not a number; left out")
    return notes


def mark_duplicates(rows: list[dict]) -> list[str]:
    """Jobs that ran the config and seed of an earlier job (a copied folder, a sweep run twice) are marked `duplicate`:
    the first one counts, and one seed is never averaged as two. A note names each pair of folders."""
    first, notes = {}, []
    for row in rows:
        key = row.pop("_same_as", None)
        if key is None or row.get("status") not in FINISHED:
            continue
        folder = Path(row["sweep"]) / row["job"]
        if key not in first:
            first[key] = folder
            continue
        same = f"the same config and seed ({row.get('seed')}) as {first[key]}"
        row.update(status="duplicate", error=f"{same}; counted there")
        notes.append(f"{folder} ran {same}: counted once, not as a second seed")
    return notes


def eval_columns(ev: dict) -> dict:
    """Every metric of every split, before and after, as the record names them (no fixed list)."""
    columns = {}
    for when, suffix in (("baseline", "before"), ("final", "after")):
        for split, result in (ev.get(when) or {}).items():
            for metric, value in (result or {}).items():
                if metric not in NOT_METRICS:  # a value that is no number is left out with a note (_drop_non_numbers)
                    columns[_column(split, metric, suffix)] = value
    for split, value in (ev.get("change_pct") or {}).items():
        columns[f"{SPLIT_SHORT.get(split, split)}_change_pct"] = value
    return columns


def same_genre_columns(probes: dict | None) -> dict:
    """`<probe>_same_genre`: whether a probe shares the training data's genre (its fall is transfer, not no forgetting).

    Per job, not per sweep: a sweep over datasets can train on a probe's genre in some jobs only.
    """
    return {
        f"{name}_same_genre": bool((about or {}).get("same_genre_as_training"))
        for name, about in (probes or {}).items()
    }


def probe_columns(frame: pd.DataFrame) -> list[str]:
    """The forgetting probes' change columns: `ref_change_pct` (one reference corpus) or `ref_<probe>_change_pct`."""
    return [c for c in frame.columns if c.startswith("ref_") and c.endswith("_change_pct")]


def probe_name(change_column: str) -> str:
    """A probe's record key from its change column: ref_python_docs_change_pct -> ref_python_docs; ref_change_pct -> ref."""
    return change_column.removesuffix("_change_pct")


def _column(split: str, metric: str, suffix: str) -> str:
    return f"{SPLIT_SHORT.get(split, split)}_{METRIC_SHORT.get(metric, metric)}_{suffix}"


def metric_columns(frame: pd.DataFrame) -> list[str]:
    """The numeric result columns of a jobs frame: the run's numbers and every evaluation metric found."""
    evals = [c for c in frame.columns if c.endswith(("_before", "_after", "_change_pct"))]
    return [c for c in [*RUN_METRICS, *evals] if c in frame.columns]


def lower_is_better(column: str) -> bool:
    """How a column sorts: a perplexity, loss or log-loss falls, an accuracy or AUC rises; counts and times fall."""
    for metric, direction in DIRECTION.items():
        if f"_{METRIC_SHORT.get(metric, metric)}_" in f"_{column}":
            return direction == "min"
    return True


def _config_value(config: dict, key: str, fallback):
    node = lookup(config, key, missing=_MISSING)
    if node is _MISSING:
        return fallback
    return node if isinstance(node, (str, int, float, bool)) or node is None else str(node)


def _hydra_overrides(job: Path) -> list[str]:
    path = job / ".hydra" / "overrides.yaml"
    try:
        return (yaml.safe_load(path.read_text()) if path.is_file() else None) or []
    except (OSError, yaml.YAMLError):
        return []


def _overrides(items: list[str]) -> dict:
    pairs = (o.split("=", 1) for o in items if isinstance(o, str) and "=" in o)
    return {k.lstrip("+~"): v for k, v in pairs if not k.lstrip("+~").startswith("hydra")}


def _choices(job: Path, record: dict | None) -> dict:
    """strategy, model, dataset: from the record, or from Hydra's files for a job without one."""
    if record and record.get("choices"):
        c = record["choices"]
        path = (record.get("config", {}).get("model") or {}).get("name_or_path")
        model = Path(path).name if path else c.get("model")
        return {"strategy": c.get("strategy"), "model": model, "dataset": c.get("dataset")}
    hydra_file = job / ".hydra" / "hydra.yaml"
    if not hydra_file.is_file():
        return {}
    choices = (yaml.safe_load(hydra_file.read_text()) or {}).get("hydra", {}).get("runtime", {}).get("choices", {})
    return {g: choices.get(g) for g in ("strategy", "model", "dataset")}


def _mb(n) -> float | None:
    return n / 2**20 if isinstance(n, (int, float)) else None


# ---------------------------------------------------------------- the comparison
def default_sort(jobs: pd.DataFrame) -> str:
    """The validation metric the jobs kept their best weights by, when they share one; else validation perplexity.

    Preference objectives' losses are on different scales: a sweep over them sorts by reward accuracy.
    """
    objectives = jobs["objective"].dropna().unique() if "objective" in jobs else []
    if len(objectives) > 1 and "val_reward_accuracy_after" in jobs:
        return "val_reward_accuracy_after"
    chosen = jobs["select"].dropna().unique() if "select" in jobs else []
    if len(chosen) == 1:
        column = _column("validation", chosen[0], "after")
        if column in jobs:
            return column
    return "val_ppl_after"


def comparison(jobs: pd.DataFrame, group_by: list[str] | None = None, sort: str | None = None) -> pd.DataFrame:
    """Jobs that differ only by seed, grouped: the seed count, and of every metric the mean, the std
    (`<m>_std`) and the half-width of the mean's 95 % Student-t confidence interval (`<m>_ci95`).

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
            row[f"{m}_std"] = values.std(ddof=1) if len(values) > 1 else math.nan
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
    """The overrides that vary across the jobs with results, seed excepted; strategy when nothing varies.

    Jobs scored on different validation tokens (eval.max_tokens, set by a preset, say) are
    never averaged together: val_tokens joins the keys when it varies.
    """
    # among the jobs with results: a failed or unreadable job's missing overrides do not make a column vary
    done = jobs[jobs["status"].isin(FINISHED)]
    done = jobs if done.empty else done
    keys = [
        k for k in jobs.attrs.get("override_keys", []) if k != "seed" and done[k].astype(str).nunique(dropna=False) > 1
    ]
    if "strategy" not in keys and "strategy" in jobs.columns:
        keys = ["strategy", *keys]
    if "val_tokens" in jobs.columns and jobs["val_tokens"].nunique() > 1:
        keys.append("val_tokens")
    return keys


# The comparison table's columns after the grouping keys, when none are asked for; PROBES stands for
# every forgetting probe's change column (ref_change_pct, or ref_<probe>_change_pct each).
PROBES = "<probes>"
DEFAULT_COLUMNS = [
    "seeds", "trainable_params", "total_params", "trainable_pct", "val_ppl_before", "val_ppl_after",
    "val_change_pct", "val_auc_before", "val_auc_after", "val_accuracy_after", "val_log_loss_after",
    "val_reward_accuracy_before", "val_reward_accuracy_after", "val_margin_after", "val_token_kl_after",
    "test_ppl_before", "test_ppl_after", "test_auc_after", "ref_ppl_before", "ref_ppl_after", PROBES,
    "train_seconds", "warmup_seconds", "tokens_per_second", "steady_tokens_per_second", "contended", "peak_memory_mb",
    "estimated_peak_mb", "checkpoint_mb", "best_step", "status", "error",
]  # fmt: skip
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
        if col in RUN_METRICS or col.endswith(("_before", "_after", "_change_pct")):
            ci = table[f"{col}_ci95"] if f"{col}_ci95" in table else pd.Series(math.nan, index=table.index)
            out[col] = [_cell(v, ci[i], col) for i, v in table[col].items()]
        else:
            out[col] = table[col].map(lambda v: "" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v))
    return out


def default_columns(table: pd.DataFrame) -> list[str]:
    """DEFAULT_COLUMNS with the probes' change columns in place, less those no row fills."""
    wanted = [c for name in DEFAULT_COLUMNS for c in (probe_columns(table) if name == PROBES else [name])]
    return [c for c in dict.fromkeys(wanted) if c in ("seeds", "status") or (c in table and table[c].notna().any())]


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
    fmt = _formatter(col)
    if ci is None or math.isnan(ci) or ci == 0:  # one seed, or a value no seed changes
        return fmt(value)
    return f"{fmt(value)} ± {_formatter(col.replace('change_', ''))(ci)}"


def _formatter(col: str):
    """Counts whole, everything else to three significant figures: a time or a loss never shows as 0.00."""
    if col in ("trainable_params", "total_params", "steps", "best_step"):
        return lambda v: f"{v:,.0f}"
    if col.endswith("_pct"):
        return lambda v: f"{v:+.3g}" if "change" in col else f"{v:.3g}"
    if col.endswith(("tokens_per_second", "samples_per_second", "_seconds", "_mb")):
        return lambda v: f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}"
    return lambda v: f"{v:.3g}"  # perplexities, losses, accuracies


# ---------------------------------------------------------------- the main metric
def main_metric(jobs: pd.DataFrame) -> str:
    """The validation metric a sweep is judged by: default_sort's, with perplexity for loss (the same
    ranking of a job, in the unit the tables show)."""
    select = default_sort(jobs)
    filled = "val_ppl_after" in jobs and jobs["val_ppl_after"].notna().any()
    return "val_ppl_after" if select == "val_loss_after" and filled else select


# ---------------------------------------------------------------- output
def write_tables(
    jobs: pd.DataFrame, table: pd.DataFrame, folder: Path, columns: list[str] | None = None, extras: dict | None = None
) -> list[Path]:
    """The comparison, every job, the extra tables (extra_tables: Markdown with their note, and CSV), the plots.

    All or none: each is written into a private folder inside `folder` and moved into place only once
    every one is whole, so that a full disk leaves the earlier tables as they were, not a 0-byte comparison.md.
    """
    pretty = for_people(table, columns)
    staging = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=folder, prefix=".tables."))
        written = []
        for made in _write_all(jobs, table, pretty, staging, extras or {}):
            os.replace(made, folder / made.name)
            written.append(folder / made.name)
    except OSError as e:  # the errno's words: pyarrow's strerror is a sentence of its own
        why = os.strerror(e.errno) if e.errno else reason(e)
        raise TransferError(
            f"cannot write the tables into {folder} ({why}); the earlier ones there are kept: "
            "free space there, or write them elsewhere (--out)"
        ) from None
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    _remove_stale(folder, written)
    return written


def _write_all(jobs: pd.DataFrame, table: pd.DataFrame, pretty: pd.DataFrame, folder: Path, extras: dict) -> list[Path]:
    written = [
        folder / f
        for f in ("comparison.md", "comparison.csv", "comparison.tex", "comparison.html", "jobs.csv", "jobs.parquet")
    ]
    written[0].write_text(pretty.to_markdown(index=False) + f"\n\n{under_table(table)}\n")
    table.to_csv(written[1], index=False)
    written[2].write_text(pretty.to_latex(index=False, escape=True))
    written[3].write_text(pretty.to_html(index=False, na_rep=""))
    flat = jobs.drop(columns=["validation_curve", "weight_change"], errors="ignore")
    flat.to_csv(written[4], index=False)
    flat.astype({c: "string" for c in flat.columns if flat[c].dtype == object}).to_parquet(written[5], index=False)
    for name, (numbers, cells, note) in extras.items():
        written += [folder / f"{name}.md", folder / f"{name}.csv"]
        written[-2].write_text(cells.to_markdown(index=False) + f"\n\n{note}\n")
        numbers.to_csv(written[-1], index=False)
    from transfer.aggregate.plots import write_plots

    return written + write_plots(jobs, table, folder)


def under_table(table: pd.DataFrame) -> str:
    """What the comparison table's ± means, and the notes of its reading (a duplicated job, a metric left out)."""
    notes = table.attrs.get("notes") or []
    return CI_NOTE + ("\n\n" + "\n".join(f"- {note}" for note in notes) if notes else "")


# what an aggregation writes only sometimes (transfer/contrasts.py, transfer/plots.py): an earlier one's may be there
OPTIONAL_OUTPUTS = ("paired.md", "paired.csv", "best_per_*.md", "best_per_*.csv", "perplexity_vs_trainable.png",
                    "gain_vs_forgetting.png", "ci_*.png", "validation_curves.png", "time_and_memory.png",
                    "task_metrics.png", "weight_change.png", "search_history.png")  # fmt: skip


def _remove_stale(folder: Path, written: list[Path]) -> None:
    """An earlier aggregation's optional tables and plots that this one did not make: left, they would pass for
    this sweep's (a paired table of a baseline no longer asked for, a plot of jobs since removed)."""
    made = {p.name for p in written}
    for pattern in OPTIONAL_OUTPUTS:
        for stale in sorted(folder.glob(pattern)):
            if stale.name not in made and stale.is_file():
                stale.unlink()
                print(f"removed {stale}: an earlier aggregation's, which this one does not make")


def aggregate(
    sweeps: list[Path], out: Path | None = None, sort: str | None = None, group_by=None, columns=None,
    baseline: str | None = None, best: str | None = None,
):  # fmt: skip
    """Read the sweeps, write the tables (into the sweep's tables/ folder), return (jobs, table, files)."""
    jobs = read_jobs(sweeps)
    table = comparison(jobs, group_by, sort)
    from transfer.aggregate.contrasts import extra_tables

    extras = extra_tables(jobs, table, baseline, best)
    files = write_tables(jobs, table, out or sweeps[-1] / "tables", columns, extras)
    return jobs, table, files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m transfer.aggregate", description=__doc__.splitlines()[0])
    parser.add_argument("sweeps", nargs="*", help="sweep folders (default: the newest under multirun/)")
    parser.add_argument("--all", action="store_true", help="every sweep under multirun/, in one table")
    parser.add_argument("--root", default=str(DEFAULT_ROOT), help="where sweeps live (default: multirun)")
    parser.add_argument(
        "--sort", help="column to sort by, best first (default: the metric the jobs selected by, else val_ppl_after)"
    )
    parser.add_argument(
        "--group-by", help="comma-separated columns to group by (default: the swept overrides but seed)"
    )
    parser.add_argument("--columns", help="comma-separated columns to show (of the grouped table)")
    parser.add_argument(
        "--baseline",
        metavar="KEY=VALUE",
        help="a group to compare the others with, paired by seed, e.g. strategy=full (writes paired.{md,csv})",
    )
    parser.add_argument(
        "--best-per",
        metavar="KEY",
        help="per value of KEY (e.g. strategy), the other hyper-parameters with the best validation metric",
    )
    parser.add_argument("--out", help="folder for the tables (default: <newest sweep>/tables)")
    args = parser.parse_args(argv)
    split = lambda s: [c.strip() for c in s.split(",") if c.strip()] if s else None  # noqa: E731
    try:
        sweeps = find_sweeps(args.sweeps, args.all, Path(args.root))
        jobs = read_jobs(sweeps)
        group_by, columns = split(args.group_by), split(args.columns)
        check_columns(group_by or [], [c for c in jobs.columns if c != "validation_curve"], "column")
        table = comparison(jobs, group_by, args.sort)
        check_columns([args.sort] if args.sort else [], shown_columns(table), "column")
        check_columns(columns or [], shown_columns(table), "column")
        from transfer.aggregate.contrasts import extra_tables

        extras = extra_tables(jobs, table, args.baseline, args.best_per)
        out = Path(args.out) if args.out else sweeps[-1] / "tables"
        files = write_tables(jobs, table, out, columns, extras)
    except TransferError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(for_people(table, columns).to_markdown(index=False) + f"\n\n{under_table(table)}")
    for name, (_, cells, note) in extras.items():
        print(f"\n{name.replace('_', ' ')}:\n\n{cells.to_markdown(index=False)}\n\n{note}")
    counts = jobs["status"].value_counts().to_dict()
    print(
        f"\n{len(jobs)} jobs ({', '.join(f'{n} {s}' for s, n in counts.items())}) from {len(sweeps)} sweep(s); tables in {out}"
    )
    log.debug("wrote %s", files)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Writing a sweep's tables and plots into a folder, all or none, and `aggregate`: read, group, write.

Written into `<sweep>/tables/`: comparison.{md,csv,tex,html}, jobs.{csv,parquet}, the contrasts asked for
(paired.{md,csv}, best_per_<key>.{md,csv}: transfer.aggregate.contrasts) and the plots (PNG). A multirun calls
`aggregate` by itself at its end (transfer.sweep.callbacks.TablesCallback).
"""

import os
import shutil
import tempfile
from pathlib import Path

import pandas as pd

from transfer.aggregate.contrasts import extra_tables
from transfer.aggregate.jobs import read_jobs
from transfer.aggregate.plots import write_plots
from transfer.aggregate.tables import comparison, for_people, markdown, under_table
from transfer.errors import TransferError, reason


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
    written[0].write_text(markdown(pretty) + f"\n\n{under_table(table, pretty.columns)}\n")
    table.to_csv(written[1], index=False)
    written[2].write_text(pretty.to_latex(index=False, escape=True))
    written[3].write_text(pretty.to_html(index=False, na_rep=""))
    flat = jobs.drop(columns=["validation_curve", "weight_change"], errors="ignore")
    flat.to_csv(written[4], index=False)
    flat.astype({c: "string" for c in flat.columns if flat[c].dtype == object}).to_parquet(written[5], index=False)
    for name, (numbers, cells, note) in extras.items():
        written += [folder / f"{name}.md", folder / f"{name}.csv"]
        written[-2].write_text(markdown(cells) + f"\n\n{note}\n")
        numbers.to_csv(written[-1], index=False)
    return written + write_plots(jobs, table, folder)


# what an aggregation writes only sometimes (contrasts.py, plots.py): an earlier one's may be there
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
    extras = extra_tables(jobs, table, baseline, best)
    files = write_tables(jobs, table, out or sweeps[-1] / "tables", columns, extras)
    return jobs, table, files

"""Comparison tables and plots from sweep output: `python -m transfer.aggregate [SWEEP ...]`.

Reads the newest sweep under multirun/ (or those named, or --all), prints the comparison and writes the tables
and plots into `<sweep>/tables/` (transfer.aggregate.output). `--baseline strategy=full` adds the other groups'
differences from that group, paired by seed, with a 95 % interval and a paired t-test (paired.{md,csv});
`--best-per strategy`, the hyper-parameters each strategy does best with on validation, and their test metrics
(best_per_<key>.{md,csv}, written for strategy whenever a sweep varies more than strategy and seed).
"""

import argparse
import logging
import sys
from pathlib import Path

from transfer.aggregate.contrasts import extra_tables
from transfer.aggregate.jobs import DEFAULT_ROOT, find_sweeps, read_jobs
from transfer.aggregate.output import write_tables
from transfer.aggregate.tables import check_columns, comparison, for_people, shown_columns, under_table
from transfer.errors import TransferError

log = logging.getLogger(__name__)


def _parser() -> argparse.ArgumentParser:
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    split = lambda s: [c.strip() for c in s.split(",") if c.strip()] if s else None  # noqa: E731
    try:
        sweeps = find_sweeps(args.sweeps, args.all, Path(args.root))
        jobs = read_jobs(sweeps)
        group_by, columns = split(args.group_by), split(args.columns)
        check_columns(group_by or [], [c for c in jobs.columns if c != "validation_curve"], "column")
        table = comparison(jobs, group_by, args.sort)
        check_columns([args.sort] if args.sort else [], shown_columns(table), "column")
        check_columns(columns or [], shown_columns(table), "column")
        extras = extra_tables(jobs, table, args.baseline, args.best_per)
        out = Path(args.out) if args.out else sweeps[-1] / "tables"
        files = write_tables(jobs, table, out, columns, extras)
    except TransferError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    pretty = for_people(table, columns)
    print(pretty.to_markdown(index=False) + f"\n\n{under_table(table, pretty.columns)}")
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

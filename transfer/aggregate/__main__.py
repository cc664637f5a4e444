"""Comparison tables and plots from sweep output: `python -m transfer.aggregate [SWEEP ...]`.

Reads the newest sweep under multirun/ (the one whose records were written last; or those named), prints the
comparison and writes the tables and plots into `<sweep>/tables/` (transfer.aggregate.output). Sweeps that measure
different things (objective, dataset, dry runs) are never one table: `--all` writes one per kind into
`multirun/tables/<kind>/`. `--baseline strategy=full` adds the other groups'
differences from that group, paired by seed, with a 95 % interval and a paired t-test (paired.{md,csv});
`--best-per strategy`, the hyper-parameters each strategy does best with on validation, and their test metrics
(best_per_<key>.{md,csv}, written for strategy whenever a sweep varies more than strategy and seed).
"""

import argparse
import logging
import sys
from pathlib import Path

from transfer.errors import TransferError
from transfer.fmt import count, reader_may_leave

# pandas, matplotlib and what reads records are imported in main, after the arguments parse: --help and a
# misspelt option answer at once, without the second that those imports take

log = logging.getLogger(__name__)


EXAMPLES = """examples:
  python -m transfer.aggregate                              the newest sweep under multirun/
  python -m transfer.aggregate multirun/lora_search         a sweep by its folder (several: one table)
  python -m transfer.aggregate --all                        every sweep under multirun/, a table per kind
  python -m transfer.aggregate --baseline strategy=full     the other strategies against full, paired by seed
  python -m transfer.aggregate --sort train_seconds --group-by strategy --columns strategy,seeds,val_ppl_after

writes comparison.{md,csv,tex,html}, jobs.{csv,parquet}, the contrasts asked for and the plots (PNG) into
<sweep>/tables/; docs/plots.md says what each plot shows."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m transfer.aggregate",
        description=__doc__.splitlines()[0],
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("sweeps", nargs="*", help="sweep folders (default: the newest under multirun/)")
    parser.add_argument(
        "--all",
        action="store_true",
        help="every sweep under --root: a table per kind (objective and dataset) in <root>/tables/<kind>/",
    )
    parser.add_argument("--root", help="where sweeps live (default: multirun)")
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
    parser.add_argument(
        "--out", help="folder for the tables (default: <newest sweep>/tables; --all: <root>/tables/<kind>)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from transfer.aggregate.jobs import DEFAULT_ROOT, TABLES, comparable_sets, find_sweeps, kind_folder, read_jobs

    root = Path(args.root) if args.root else DEFAULT_ROOT
    try:
        sweeps = find_sweeps(args.sweeps, args.all, root)
        jobs = read_jobs(sweeps)
        kinds = comparable_sets(jobs)
        if len(kinds) > 1 and not args.all:
            apart = "; ".join(f"{kind}: {', '.join(s)}" for kind, s in kinds.items())
            raise TransferError(
                f"these sweeps measure different things, which one table never mixes ({apart}); "
                "allowed: sweeps of one objective and dataset, or --all, which writes a table per kind"
            )
        if not args.all:
            _report(args, jobs, sweeps, Path(args.out) if args.out else sweeps[-1] / TABLES)
            return 0
        base = Path(args.out) if args.out else root / TABLES
        if len(kinds) > 1:
            print(
                f"{len(sweeps)} sweeps measure {len(kinds)} different things (objective and dataset; dry runs and "
                "sweeps with no finished job apart): a table for each, never one mixing them\n"
            )
        for i, (kind, members) in enumerate(kinds.items()):
            print(("\n" if i else "") + f"## {kind}: {count(len(members), 'sweep')}\n")
            found = jobs if len(kinds) == 1 else read_jobs([Path(s) for s in members])
            _report(args, found, members, base / kind_folder(kind))
    except TransferError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _report(args, jobs, sweeps: list, out: Path) -> None:
    """One table of comparable sweeps: checked, grouped, written into `out` and printed."""
    from transfer.aggregate.contrasts import extra_tables
    from transfer.aggregate.output import write_tables
    from transfer.aggregate.tables import check_columns, comparison, for_people, markdown, shown_columns, under_table

    split = lambda s: [c.strip() for c in s.split(",") if c.strip()] if s else None  # noqa: E731
    group_by, columns = split(args.group_by), split(args.columns)
    check_columns(group_by or [], [c for c in jobs.columns if c != "validation_curve"], "column")
    table = comparison(jobs, group_by, args.sort)
    check_columns([args.sort] if args.sort else [], shown_columns(table), "column")
    check_columns(columns or [], shown_columns(table), "column")
    extras = extra_tables(jobs, table, args.baseline, args.best_per)
    files = write_tables(jobs, table, out, columns, extras)
    pretty = for_people(table, columns)
    print(markdown(pretty) + f"\n\n{under_table(table, pretty.columns)}")
    for name, (_, cells, note) in extras.items():
        print(f"\n{name.replace('_', ' ')}:\n\n{markdown(cells)}\n\n{note}")
    counts = jobs["status"].value_counts().to_dict()
    print(
        f"\n{count(len(jobs), 'job')} ({', '.join(f'{n} {s}' for s, n in counts.items())}) from "
        f"{count(len(sweeps), 'sweep')}; tables in {out}"
    )
    log.debug("wrote %s", files)


if __name__ == "__main__":
    sys.exit(reader_may_leave(main))

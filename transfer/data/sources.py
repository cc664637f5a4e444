"""Rows of a dataset, per split: from local files or the hub, through the `datasets` library.

A split the source lacks is carved out of the training rows (`holdout_fraction`, seeded by
`split_seed`, the same for every job of a sweep). What a row becomes (text for `lm`, a
conversation for `sft`) is the objective's business.

Each row remembers where it was read (`Row.origin`: the file and line, or the hub split and
row), so that a problem with a row names the place to fix it, also after the row was held out;
the lines are found only when a message asks for one.
A CSV file's cells are read as text, as written: pandas would make "42" a number and "NA" a null.
"""

import csv
import logging
import random
import sys
from functools import partial
from pathlib import Path

from transfer.config.data import PYTHON_DOCS_PARTS, label_fields
from transfer.config.preflight import (
    BUILDERS,
    alternative,
    answers,
    blank,
    check_data_files,
    csv_rows,
    is_text,
    json_item_lines,
)
from transfer.errors import TransferError, first_line, innermost

log = logging.getLogger(__name__)
SPLITS = ("train", "validation", "test")


class Row(dict):
    """A row's fields, and where it was read: `origin` is "dataset.train_files: 'train.jsonl' line 8" or the like."""

    __slots__ = ("places", "index")

    @property
    def origin(self) -> str | None:
        return self.places(self.index)


class Places:
    """Where each row of a table was read, worked out only when a message asks for it: finding a row's line reads
    its file again, which a run whose rows are all well is spared. `find()` lists each row's place, or gives None
    where the rows cannot be told apart by line (they are then named by their number in the split)."""

    def __init__(self, find):
        self._find, self._found = find, None

    def __call__(self, index: int) -> str | None:
        if self._found is None:
            self._found = self._find() or []
        return self._found[index] if index < len(self._found) else None


def origin(row: dict, otherwise: str) -> str:
    """Where the row was read, for messages; `otherwise` for a row made in memory or that cannot be placed."""
    return (row.origin if isinstance(row, Row) else None) or otherwise


def load_rows(cfg, needs: list[tuple[str, ...]]) -> dict[str, list[dict]]:
    """The rows of each split that hold something in a field of `needs`; a missing split is held out from train.

    `needs` lists alternatives, each the fields a row must have (transfer.config.preflight.check_data_files).
    Rows of examples whose answers are all empty are refused, some of them warned of: such an
    answer is not learned, only the end of its turn.
    """
    if "path" in cfg:
        rows = {name: _hub_split(cfg, getattr(cfg, f"{name}_split"), needs) for name in SPLITS}
    else:
        rows = {name: _files_split(cfg, name, list(getattr(cfg, f"{name}_files")), needs) for name in SPLITS}
    missing = [name for name in ("validation", "test") if rows[name] is None]
    if missing:
        rows.update(_hold_out(cfg, rows["train"], missing))
    if not is_text(needs):
        for name, split in rows.items():
            _empty_answers(split, needs, label_fields(cfg), f"dataset {cfg.name!r} {name}")
    return rows


def _empty_answers(rows: list[dict], needs, labels, where: str) -> None:
    empty = []
    for row in rows:
        fields = alternative(row, needs)
        if fields is not None and all(blank(a) for a in answers(row, fields, labels)):
            empty.append(row)
    if not empty:
        return
    first = origin(empty[0], f"row {rows.index(empty[0]) + 1}")
    if len(empty) == len(rows):
        raise TransferError(
            f"{where}: the answer of every one of its {len(rows)} rows is empty ({first}, ...): nothing of an answer "
            "would be scored, only the end of each turn; allowed: rows with answers"
        )
    log.warning(
        "%s: %d of %d rows have an empty answer (%s%s): nothing of their answers is scored, only the end of the turn",
        where, len(empty), len(rows), first, ", ..." if len(empty) > 1 else "",
    )  # fmt: skip


def load_texts(cfg) -> dict[str, list[str]]:
    """The non-empty texts of each split (the field `text_field`)."""
    rows = load_rows(cfg, [(cfg.text_field,)])
    return {
        name: [r[cfg.text_field] for r in split if isinstance(r[cfg.text_field], str)] for name, split in rows.items()
    }


def _files_split(cfg, split: str, files: list[str], needs) -> list[dict] | None:
    if not files:
        if split == "train":
            raise TransferError(f"dataset.train_files is empty; allowed: one or more of {', '.join(BUILDERS)} files")
        return None
    return read_files(cfg, files, f"dataset.{split}_files", needs)


def read_files(cfg, files: list[str], where: str, needs: list[tuple[str, ...]] | None = None) -> list[dict]:
    """The rows of local files, one type per call, that hold something in a field of `needs` (default: the text)."""
    needs = needs or [(cfg.text_field,)]
    # done at start-up: cached, unless a file changed
    check_data_files(files, where, needs, cfg.get("build_hint"), labels=label_fields(cfg))
    suffixes = {BUILDERS[Path(f).suffix.lower()] for f in files}
    if len(suffixes) > 1:
        raise TransferError(f"{where} mixes file types {sorted(suffixes)}; use one type per split")
    builder = suffixes.pop()
    paths = [Path(f).expanduser() for f in files]
    kwargs = {}
    if builder == "text":
        kwargs = {"sample_by": cfg.txt_sample_by.value, "encoding": "utf-8-sig"}  # no byte-order mark in the text
    elif builder == "csv":
        columns = {name for path in paths for name in _csv_header(path)}
        kwargs = {"encoding": "utf-8-sig", "na_filter": False, "converters": dict.fromkeys(columns, str)}
    import datasets

    quiet_progress_bars(datasets)
    try:
        table = datasets.load_dataset(builder, data_files=[str(p) for p in paths], split="train", **kwargs)
    except Exception as e:  # datasets wraps the reader's error: the innermost one says what is wrong
        raise TransferError(f"{where}: cannot read {list(files)}: {first_line(innermost(e))}") from None
    places = Places(partial(_file_places, where, list(files), builder, kwargs.get("sample_by"), len(table)))
    return _rows(table, needs, where, places)


def _file_places(where: str, files: list[str], builder: str, sample_by: str | None, rows: int) -> list[str] | None:
    """Each of the table's rows as "<where>: '<file>' line N" (row N of a Parquet file), in the table's order; None
    where the files' rows, as numbered here, are not the table's."""
    found = [_numbers(Path(f).expanduser(), builder, sample_by) for f in files]
    if any(p is None for p in found) or sum(len(p[1]) for p in found) != rows:
        return None
    return [f"{where}: {f!r} {unit} {n}" for f, (unit, numbers) in zip(files, found, strict=True) for n in numbers]


def _row_places(where: str, rows: int) -> list[str]:
    return [f"{where} row {n}" for n in range(1, rows + 1)]


def _csv_header(path: Path) -> list[str]:
    with open(path, newline="", encoding="utf-8-sig", errors="replace") as fh:
        return next(csv.reader(fh), [])


def _numbers(path: Path, builder: str, sample_by: str | None) -> tuple[str, list[int] | range] | None:
    """What numbers a file's rows (line, or row of a Parquet file) and the number of each row `datasets` reads from
    it, in order; None where that cannot be told."""
    try:
        if builder == "parquet":
            import pyarrow.parquet as pq

            return "row", range(1, pq.ParquetFile(path).metadata.num_rows + 1)
        if builder == "csv":
            with open(path, newline="", encoding="utf-8-sig", errors="replace") as fh:
                reader = csv.reader(fh)
                header = next(reader, [])
                return "line", [line for line, _ in csv_rows(reader, header)]
        if builder == "text" and sample_by == "line":
            with open(path, encoding="utf-8-sig", errors="replace") as fh:
                return "line", range(1, sum(1 for _ in fh) + 1)
        if builder == "text":
            with open(path, encoding="utf-8-sig", errors="replace") as fh:
                text = fh.read()
            if sample_by == "document":
                return "line", [1]
            lines, line = [], 1
            for piece in text.split("\n\n"):  # as `datasets` cuts paragraphs; empty pieces are no row
                if piece:
                    lines.append(line)
                line += piece.count("\n") + 2
            return "line", lines
        with open(path, "rb") as fh:
            head = fh.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
            fh.seek(0)
            if head[:1] == b"[":
                return "line", json_item_lines(fh.read().decode("utf-8-sig", errors="replace"))
            return "line", [number for number, line in enumerate(fh, start=1) if line.strip()]
    except (OSError, ValueError, IndexError):
        return None


def quiet_progress_bars(datasets) -> None:
    """Bars on a terminal only: in a log file their carriage returns make a flood of partial lines."""
    if not sys.stderr.isatty():
        datasets.disable_progress_bars()


def _hub_split(cfg, split: str | None, needs) -> list[dict] | None:
    if split is None:
        return None
    return read_hub(cfg, split, f"dataset.path={cfg.path!r} split {split!r}", needs)


def read_hub(cfg, split: str, where: str, needs: list[tuple[str, ...]] | None = None) -> list[dict]:
    """The rows of one split of a hub dataset that hold something in a field of `needs` (default: the text)."""
    import datasets

    quiet_progress_bars(datasets)
    try:
        table = datasets.load_dataset(cfg.path, cfg.config_name, split=split, revision=cfg.revision)
    except ValueError as e:
        raise TransferError(f"{where}: split not available ({first_line(e)})") from None
    except Exception as e:
        raise TransferError(
            f"{where} (config {cfg.config_name!r}) cannot be loaded from the hub, offline or unknown? ({first_line(e)})"
        ) from None
    return _rows(table, needs or [(cfg.text_field,)], where, Places(partial(_row_places, where, len(table))))


def _rows(table, needs: list[tuple[str, ...]], where: str, places: Places) -> list[dict]:
    """The rows that hold something in a field of `needs`, each a Row that can say where it was read (`places`)."""
    present = [f for alternative in needs for f in alternative if f in table.column_names]
    if not present:
        what = f"dataset.text_field={needs[0][0]!r}" if len(needs) == 1 else "field an example needs"
        raise TransferError(f"{where}: no {what}; allowed: {', '.join(table.column_names)}")
    rows = [_row(fields, places, index) for index, fields in enumerate(table.to_list())]
    kept = [row for row in rows if any(_filled(row.get(f)) for f in present)]
    if rows and not kept:
        raise TransferError(f"{where}: none of its {len(rows)} rows holds anything in {', '.join(map(repr, present))}")
    return kept


def _row(fields: dict, places: Places, index: int) -> Row:
    row = Row(fields)
    row.places, row.index = places, index
    return row


def _filled(value) -> bool:
    """Text that is not blank, or a non-empty list (a conversation)."""
    return bool(value.strip()) if isinstance(value, str) else isinstance(value, list) and bool(value)


def _hold_out(cfg, train: list, names: list[str]) -> dict[str, list]:
    """Move a seeded random `holdout_fraction` of the training rows into each missing split."""
    n_each = max(1, round(len(train) * cfg.holdout_fraction))
    if cfg.holdout_fraction == 0 or len(train) <= n_each * len(names):
        raise TransferError(
            f"dataset {cfg.name!r} has no {' or '.join(names)} split and {len(train)} training rows "
            f"cannot spare dataset.holdout_fraction={cfg.holdout_fraction} for it; "
            "give split files or a fraction in (0, 1)"
        )
    order = list(range(len(train)))
    random.Random(cfg.split_seed).shuffle(order)
    held = {}
    for i, name in enumerate(names):
        held[name] = [train[j] for j in sorted(order[i * n_each : (i + 1) * n_each])]
    keep = sorted(order[len(names) * n_each :])
    train[:] = [train[j] for j in keep]
    log.info("held out %s documents each for %s from the training split", n_each, ", ".join(names))
    return held


def python_docs_prose(part: str = "all") -> list[str]:
    """Paragraphs of English prose from the Python documentation every CPython ships.

    Code, grammar rules and headings are indented or underlined there; they are left out.
    `part`: every topic, or the two disjoint parts that keep a probe apart from what trained:
    `train` is two topics of every three in name order (the tiny model's pre-training text and
    replay's general text), `heldout` the third (the forgetting probe), less the paragraphs that
    the train topics repeat word for word (64 of 339 in Python 3.11's documentation).
    """
    from pydoc_data.topics import topics

    if part not in PYTHON_DOCS_PARTS:
        raise TransferError(f"python_docs part {part!r}; allowed: {', '.join(PYTHON_DOCS_PARTS)}")
    by_part = {"train": [], "heldout": []}
    for i, key in enumerate(sorted(topics)):
        by_part["heldout" if i % 3 == 2 else "train"].extend(_prose(topics[key]))
    if part == "all":
        return [p for key in sorted(topics) for p in _prose(topics[key])]
    if part == "heldout":
        seen = set(by_part["train"])
        return [p for p in by_part["heldout"] if p not in seen]
    return by_part["train"]


def _prose(topic: str) -> list[str]:
    paragraphs = []
    for para in topic.split("\n\n"):
        lines = para.splitlines()
        if not lines or lines[0].startswith(" ") or any(set(line) <= set("*=-~^") for line in lines if line):
            continue
        text = " ".join(line.strip() for line in lines)
        if len(text) > 80 and text[-1] in ".:)" and sum(c.isalpha() for c in text) > 0.7 * len(text):
            paragraphs.append(text)
    return paragraphs

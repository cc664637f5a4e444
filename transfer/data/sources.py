"""Rows of a dataset, per split: from local files or the hub, through the `datasets` library.

A split the source lacks is carved out of the training rows (`holdout_fraction`, seeded by
`split_seed`, the same for every job of a sweep). What a row becomes (text for `lm`, a
conversation for `sft`) is the objective's business.
"""

import logging
import random
import sys
from pathlib import Path

from transfer.errors import TransferError, first_line, innermost
from transfer.inputs import BUILDERS, check_data_files

log = logging.getLogger(__name__)
SPLITS = ("train", "validation", "test")


def load_rows(cfg, needs: list[tuple[str, ...]]) -> dict[str, list[dict]]:
    """The rows of each split that hold something in a field of `needs`; a missing split is held out from train.

    `needs` lists alternatives, each the fields a row must have (transfer.inputs.check_data_files).
    """
    if "path" in cfg:
        rows = {name: _hub_split(cfg, getattr(cfg, f"{name}_split"), needs) for name in SPLITS}
    else:
        rows = {name: _files_split(cfg, name, list(getattr(cfg, f"{name}_files")), needs) for name in SPLITS}
    missing = [name for name in ("validation", "test") if rows[name] is None]
    if missing:
        rows.update(_hold_out(cfg, rows["train"], missing))
    return rows


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
    check_data_files(files, where, needs, cfg.get("build_hint"))  # done at start-up: cached, unless a file changed
    suffixes = {BUILDERS[Path(f).suffix.lower()] for f in files}
    if len(suffixes) > 1:
        raise TransferError(f"{where} mixes file types {sorted(suffixes)}; use one type per split")
    builder = suffixes.pop()
    kwargs = {"sample_by": cfg.txt_sample_by.value} if builder == "text" else {}
    import datasets

    quiet_progress_bars(datasets)
    try:
        table = datasets.load_dataset(
            builder, data_files=[str(Path(f).expanduser()) for f in files], split="train", **kwargs
        )
    except Exception as e:  # datasets wraps the reader's error: the innermost one says what is wrong
        raise TransferError(f"{where}: cannot read {list(files)}: {first_line(innermost(e))}") from None
    return _rows(table, needs, where)


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
    return _rows(table, needs or [(cfg.text_field,)], where)


def _rows(table, needs: list[tuple[str, ...]], where: str) -> list[dict]:
    present = [f for alternative in needs for f in alternative if f in table.column_names]
    if not present:
        what = f"dataset.text_field={needs[0][0]!r}" if len(needs) == 1 else "field an example needs"
        raise TransferError(f"{where}: no {what}; allowed: {', '.join(table.column_names)}")
    return [row for row in table.to_list() if any(_filled(row.get(f)) for f in present)]


def _filled(value) -> bool:
    """Text that is not blank, or a non-empty list (a conversation)."""
    return bool(value.strip()) if isinstance(value, str) else isinstance(value, list) and bool(value)


def _hold_out(cfg, train: list, names: list[str]) -> dict[str, list]:
    """Move a seeded random `holdout_fraction` of the training rows into each missing split."""
    n_each = max(1, round(len(train) * cfg.holdout_fraction))
    if cfg.holdout_fraction == 0 or len(train) <= n_each * len(names):
        raise TransferError(
            f"dataset {cfg.name!r} has no {' or '.join(names)} split and {len(train)} training documents "
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


PYTHON_DOCS_PARTS = ("all", "train", "heldout")


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

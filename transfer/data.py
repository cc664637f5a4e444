"""Text splits -> token blocks.

Each split's documents are tokenized, joined with an end-of-text token and cut
into non-overlapping blocks of `block_size` tokens. Training uses whole blocks
only; evaluation keeps the last partial block too (padding masked out), so every
token of a split is scored except the first of each block, which has no context
to be predicted from; the same blocks serve before and after training.
"""

import bisect
import logging
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from transfer.errors import TransferError, first_line, innermost
from transfer.inputs import BUILDERS, check_data_files

log = logging.getLogger(__name__)
SPLITS = ("train", "validation", "test")
IGNORE = -100  # label of positions that are not scored


@dataclass
class Blocks:
    input_ids: torch.Tensor  # [n_blocks, block_size]
    # input_ids with IGNORE on the padding of the last partial block. Padding sits
    # after every real token, so causal attention never sees it: no mask needed.
    labels: torch.Tensor
    documents: int
    tokens: int  # real (non-padding) tokens
    texts: list[str] = field(default_factory=list, repr=False)  # the documents, kept for validation only

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def summary(self) -> dict:
        return {"documents": self.documents, "tokens": self.tokens, "blocks": len(self)}


def load_splits(cfg, tokenizer, block_size: int, max_eval_tokens: int | None = None) -> dict[str, Blocks]:
    """Blocks for train, validation and test from the `dataset` config.

    max_eval_tokens keeps the first that many tokens of validation and test (eval.max_tokens).
    """
    texts = load_texts(cfg)
    splits = {}
    for name in SPLITS:
        ids, starts = tokenize(texts[name], tokenizer)
        if not ids:
            raise TransferError(
                f"dataset {cfg.name!r}: the {name} split is empty (no text in field {cfg.text_field!r})"
            )
        ids, documents = first_tokens(ids, starts, max_eval_tokens if name != "train" else None)
        pad = tokenizer.eos_token_id or 0
        splits[name] = to_blocks(ids, block_size, pad, keep_partial=name != "train", documents=documents)
        if name == "validation":
            splits[name].texts = texts[name]
        if name == "train" and len(splits[name]) == 0:
            raise TransferError(
                f"dataset {cfg.name!r}: the train split has {len(ids)} tokens, fewer than one block "
                f"(block_size={block_size}); allowed: block_size <= {len(ids)}, or more training text"
            )
    return splits


def load_texts(cfg) -> dict[str, list[str]]:
    """Non-empty documents per split; a missing validation or test split is held out from train."""
    if "path" in cfg:
        texts = {name: _hub_split(cfg, getattr(cfg, f"{name}_split")) for name in SPLITS}
    else:
        texts = {name: _files_split(cfg, name, list(getattr(cfg, f"{name}_files"))) for name in SPLITS}
    missing = [name for name in ("validation", "test") if texts[name] is None]
    if missing:
        texts.update(_hold_out(cfg, texts["train"], missing))
    return texts


def _files_split(cfg, split: str, files: list[str]) -> list[str] | None:
    if not files:
        if split == "train":
            raise TransferError(f"dataset.train_files is empty; allowed: one or more of {', '.join(BUILDERS)} files")
        return None
    return read_files(cfg, files, f"dataset.{split}_files")


def read_files(cfg, files: list[str], where: str) -> list[str]:
    """The non-empty texts of local files, one type per call, through the `datasets` library."""
    check_data_files(files, where, cfg.text_field)  # done at start-up already: cached, unless a file changed
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
    return _column(cfg, table, where)


def quiet_progress_bars(datasets) -> None:
    """Bars on a terminal only: in a log file their carriage returns make a flood of partial lines."""
    if not sys.stderr.isatty():
        datasets.disable_progress_bars()


def _hub_split(cfg, split: str | None) -> list[str] | None:
    if split is None:
        return None
    return read_hub(cfg, split, f"dataset.path={cfg.path!r} split {split!r}")


def read_hub(cfg, split: str, where: str) -> list[str]:
    """The non-empty texts of one split of a hub dataset."""
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
    return _column(cfg, table, where)


def _column(cfg, table, where: str) -> list[str]:
    if cfg.text_field not in table.column_names:
        raise TransferError(
            f"{where}: no field dataset.text_field={cfg.text_field!r}; allowed: {', '.join(table.column_names)}"
        )
    return [t for t in table[cfg.text_field] if isinstance(t, str) and t.strip()]


def _hold_out(cfg, train: list[str], names: list[str]) -> dict[str, list[str]]:
    """Move a seeded random `holdout_fraction` of the training documents into each missing split."""
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


def load_reference(cfg, tokenizer, block_size: int) -> Blocks | None:
    """The reference (forgetting) corpus as evaluation blocks; None when eval.reference=none."""
    if cfg.name == "none":
        return None
    if "files" in cfg:
        texts = read_files(cfg, list(cfg.files), "eval.reference.files")
    elif "path" in cfg:
        texts = read_hub(cfg, cfg.split, f"eval.reference.path={cfg.path!r} split {cfg.split!r}")
    else:
        texts = python_docs_prose()
    ids, starts = tokenize(texts, tokenizer)
    if not ids:
        raise TransferError(
            f"eval.reference={cfg.name!r} is empty (no text in field {cfg.text_field!r}); give it text, or eval/reference=none"
        )
    ids, documents = first_tokens(ids, starts, cfg.max_tokens)
    return to_blocks(ids, block_size, tokenizer.eos_token_id or 0, keep_partial=True, documents=documents)


def opening_words(texts: list[str], n: int = 3, words: int = 6) -> list[str]:
    """Prompts for samples when none are configured: the first words of the first documents long enough to go on."""
    long_enough = [t.split() for t in texts if len(t.split()) >= 2 * words]
    return [" ".join(w[:words]) for w in (long_enough or [t.split() for t in texts if t.split()])[:n]]


def first_tokens(ids: list[int], starts: list[int], max_tokens: int | None) -> tuple[list[int], int]:
    """The first max_tokens of a split (all when None), and how many documents they touch, whole or in part."""
    if max_tokens is None or len(ids) <= max_tokens:
        return ids, len(starts)
    return ids[:max_tokens], bisect.bisect_left(starts, max_tokens)


def python_docs_prose() -> list[str]:
    """Paragraphs of English prose from the Python documentation every CPython ships.

    Code, grammar rules and headings are indented or underlined there; they are left out.
    """
    from pydoc_data.topics import topics

    paragraphs = []
    for key in sorted(topics):
        for para in topics[key].split("\n\n"):
            lines = para.splitlines()
            if not lines or lines[0].startswith(" ") or any(set(line) <= set("*=-~^") for line in lines if line):
                continue
            text = " ".join(line.strip() for line in lines)
            if len(text) > 80 and text[-1] in ".:)" and sum(c.isalpha() for c in text) > 0.7 * len(text):
                paragraphs.append(text)
    return paragraphs


def tokenize(texts: list[str], tokenizer) -> tuple[list[int], list[int]]:
    """Token ids of all documents, each ending in the end-of-text token, and where each document starts.

    The starts count documents exactly, even with no end-of-text token or one inside a text.
    """
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    starts: list[int] = []
    for start in range(0, len(texts), 1000):
        for doc in tokenizer(texts[start : start + 1000])["input_ids"]:
            starts.append(len(ids))
            ids.extend(doc)
            if eos is not None and (not doc or doc[-1] != eos):
                ids.append(eos)
    return ids, starts


def to_blocks(ids: list[int], block_size: int, pad_id: int, keep_partial: bool, documents: int = 0) -> Blocks:
    n_full = len(ids) // block_size
    rows = torch.tensor(ids[: n_full * block_size], dtype=torch.long).view(n_full, block_size)
    mask = torch.ones_like(rows)
    rest = len(ids) - n_full * block_size
    if keep_partial and rest:
        tail = torch.full((1, block_size), pad_id, dtype=torch.long)
        tail[0, :rest] = torch.tensor(ids[n_full * block_size :])
        tail_mask = torch.zeros_like(tail)
        tail_mask[0, :rest] = 1
        rows, mask = torch.cat([rows, tail]), torch.cat([mask, tail_mask])
    labels = rows.masked_fill(mask == 0, IGNORE)
    return Blocks(rows, labels, documents=documents, tokens=int(mask.sum()))

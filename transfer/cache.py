"""A sweep's shared work, done once: tokenized text and the untrained model's scores.

Jobs of a sweep that read the same texts with the same tokenizer, and start from a model that
computes the same function, would tokenize and score the same baseline again and again. Each
result is kept on disk under a key that hashes everything it depends on, so it is reused only
when nothing that affects it changed:

- tokens: the texts themselves, the tokenizer's whole definition and the separator;
- a baseline (one evaluator's result before training: the objective's metrics, the probes', the
  samples ...): one entry per evaluator, under a key that evaluation/__init__.py makes of what
  that evaluator depends on (the tokens it scores, its settings, the objective's, the tokenizer
  where it tokenizes, the device and precision) and of the model's *function*: its logits on the
  first sequence of each split it reads and of the objective's, bit for bit, after the strategy
  was applied; for the benchmarks, which read their own data, on fixed tokens instead, so that a
  job of another objective or dataset finds them. LoRA starts as the base model plus exact zeros
  and shares the baseline of full fine-tuning; `scratch` or another `init_from` compute their own
  (DoRA, whose norm is recomputed in another order, where that order moves a bit). One
  evaluator's settings changed, the others' entries are still found.

Entries are written atomically, each writer through a temporary file of its own (parallel jobs
may race to write the same one; either copy is right), and read with `torch.load(weights_only=True)`
or as JSON: nothing executable is read. Each holds a SHA-256 of its content: an entry that was
edited, cut short, written by something else or that does not load is computed again, with a
warning naming it, and replaced. The folder is `<sweep>/.cache` in a sweep (`cache.dir` moves it;
`cache.enabled=false` turns it off); it must be a folder this job can write in, checked before
anything is computed.
"""

import contextlib
import hashlib
import json
import logging
import platform
import tempfile
from pathlib import Path
from typing import Any

import torch

from transfer.config.preflight import check_writable_folder
from transfer.errors import TransferError, first_line, reason
from transfer.record import write_atomically

log = logging.getLogger(__name__)
CHECKSUM = "sha256"  # the key under which an entry keeps the digest of its content
_folder: Path | None = None
_stats: dict = {}


def start(folder: Path | None) -> dict:
    """From now on, reuse and keep results in `folder` (None: compute everything). Returns the hit/miss counts."""
    global _folder, _stats
    if folder is not None:
        writable(Path(folder), "cache.dir")
    _folder, _stats = (Path(folder) if folder is not None else None), {}
    return _stats


def writable(folder: Path, what: str) -> None:
    """Make `folder` if need be and prove a file can be written in it: refused in one line before any work whose
    result would be kept there is done (a read-only folder, or a file in its place)."""
    check_writable_folder(folder, what)  # the same words as at start-up
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise TransferError(
            f"{what}={str(folder)!r} cannot be written in ({reason(e)}); allowed: a folder this job can write in"
        ) from None


def stop() -> None:
    start(None)


@contextlib.contextmanager
def use(folder: Path | None):
    """start(folder) within the block, and stop() after it. Yields the hit/miss counts."""
    try:
        yield start(folder)
    finally:
        stop()


def active() -> bool:
    return _folder is not None


def digest(*parts) -> str:
    """SHA-256 of JSON-able parts, tensors (their bytes, dtype and shape) and strings."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, torch.Tensor):
            t = part.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        else:
            h.update(json.dumps(part, sort_keys=True, default=str).encode())
        h.update(b"\x00")
    return h.hexdigest()


def tokenizer_digest(tokenizer) -> str | None:
    """The tokenizer's whole definition (vocabulary, merges, normaliser, special tokens); None if it has no JSON form."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    return digest(type(tokenizer).__name__, backend.to_str(), tokenizer.all_special_tokens, tokenizer.padding_side)


def tokens(texts: list[str], tokenizer, separator: int | None, compute) -> tuple[list[int], list[int]]:
    """compute() -> (ids, starts), or the copy kept from an earlier job with the same texts and tokenizer."""
    which = tokenizer_digest(tokenizer) if _folder is not None else None
    if which is None:
        return compute()
    path = _folder / f"tokens-{digest(texts, which, separator)}.pt"
    kept = load_tensors(path, ("ids", "starts"), "tokens")
    if kept is not None:
        _count("tokens", "hits")
        return kept["ids"].tolist(), kept["starts"].tolist()
    ids, starts = compute()
    save_tensors(path, {"ids": torch.tensor(ids, dtype=torch.long), "starts": torch.tensor(starts, dtype=torch.long)})
    _count("tokens", "misses")
    return ids, starts


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Named tensors and the digest of them, written atomically."""
    _write(path, lambda f: torch.save({**tensors, CHECKSUM: _tensors_digest(tensors)}, f))


def load_tensors(path: Path, names, kind: str) -> dict[str, torch.Tensor] | None:
    """The named tensors kept at `path`, or None: none kept, or an entry that does not hold exactly them with the
    digest they were written with (said in a warning, and counted: it is computed again and replaced)."""
    if not path.is_file():
        return None
    try:
        kept = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # cut short, not torch's format, or objects weights_only refuses to build
        return damaged(path, kind, f"unreadable: {first_line(e)}")
    if not isinstance(kept, dict) or set(kept) != {*names, CHECKSUM}:
        return damaged(path, kind, "not an entry of this cache (other contents)")
    tensors = {name: kept[name] for name in names}
    if not all(isinstance(t, torch.Tensor) for t in tensors.values()) or kept[CHECKSUM] != _tensors_digest(tensors):
        return damaged(path, kind, "its content differs from the checksum written with it")
    return tensors


def _tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    return digest(*(x for name in sorted(tensors) for x in (name, tensors[name])))


def damaged(path: Path, kind: str | tuple, why: str) -> None:
    log.warning("cache entry %s is damaged (%s): computing it again", path, why)
    _count(kind, "damaged")
    return None


FIXED = "fixed_tokens"  # model_function's entry for the tokens no data chose (no split is so named)


@torch.no_grad()
def model_function(model, splits: dict, hardware, vocab: int, length: int = 64) -> dict[str, str]:
    """What the model computes, as a hash per split: its logits on the first `length` tokens of the split's first
    sequence (each entry's key takes those of the splits it reads); and under FIXED, on `length` token ids below
    `vocab` drawn from a fixed seed, which depend on no dataset: the key of an evaluator that reads its own data (the
    benchmarks), found by a job of any objective or dataset with the same model.

    Two models share a hash where their logits are the same to the bit on those tokens: LoRA's or IA3's added exact
    zeros (the base's function: rightly shared), or weights that differ only where those tokens never reach (an
    untied embedding row of another token, a position past `length`) or by less than the precision in use keeps
    (which the evaluators, under the same autocast, do not see either). Training, another initialisation (scratch)
    or a parent's merged adapter (init_from) change them; DoRA's norm, recomputed in another order, where that order
    moves a bit (on tiny on a CPU it does not)."""
    sequences = {
        name: splits[name].get(0)[0][:length] for name in sorted(splits) if name != "train" and len(splits[name])
    }
    sequences[FIXED] = torch.randint(vocab, (length,), generator=torch.Generator().manual_seed(0))
    was_training = model.training
    model.eval()
    h = {}
    for name, ids in sequences.items():
        with hardware.autocast():
            # no cache: one built layer by layer would make compiled blocks (hardware.compile) compile once a layer
            h[name] = digest(model(input_ids=ids.unsqueeze(0).to(hardware.device), use_cache=False).logits.float())
    model.train(was_training)
    return h


def baseline(key: dict, compute, part: str) -> tuple[Any, bool]:
    """compute() -> a JSON-able result, or the one an earlier job kept under the same key; and whether it was kept.
    `part` (which evaluator's) names the entry's file and where its hits and misses are counted: baseline.<part>."""
    if _folder is None:
        return compute(), False
    path = _folder / f"baseline-{part}-{digest(part, key)}.json"
    kept = _load_json(path, ("baseline", part))
    if kept is not None:
        _count(("baseline", part), "hits")
        return kept, True
    result = compute()
    _write(path, lambda f: f.write(json.dumps({CHECKSUM: digest(result), "result": result}).encode()))
    key_file = _folder / f"{path.stem}.key.json"  # what it depends on, for people
    _write(key_file, lambda f: f.write(json.dumps(key, indent=1, default=str).encode()))
    _count(("baseline", part), "misses")
    return result, False


def _load_json(path: Path, kind: str | tuple):
    """A JSON entry's result, or None: none kept, or one whose content differs from its digest (a warning)."""
    if not path.is_file():
        return None
    try:
        kept = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return damaged(path, kind, f"unreadable: {first_line(e)}")
    if not isinstance(kept, dict) or set(kept) != {CHECKSUM, "result"}:
        return damaged(path, kind, "not an entry of this cache (other contents)")
    if kept[CHECKSUM] != digest(kept["result"]):
        return damaged(path, kind, "its content differs from the checksum written with it")
    return kept["result"]


def environment() -> dict:
    """What every entry depends on beyond its inputs: the code that made it and the libraries it ran on."""
    import transformers

    here = Path(__file__).resolve().parent
    code = [
        p.read_bytes() for folder in ("data", "objectives", "evaluation") for p in sorted((here / folder).glob("*.py"))
    ]
    return {"code": digest(*(hashlib.sha256(c).hexdigest() for c in code)), "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}  # fmt: skip


def _count(kind: str | tuple, outcome: str) -> None:
    """Hits and misses of a kind of entry (and, where there were any, entries found damaged); a tuple kind counts
    within its first part: ("baseline", "probes") as {"baseline": {"probes": {...}}}."""
    counts = _stats
    for level in (kind,) if isinstance(kind, str) else kind:
        counts = counts.setdefault(level, {})
    if outcome != "damaged":
        counts.setdefault("hits", 0)
        counts.setdefault("misses", 0)
    counts[outcome] = counts.get(outcome, 0) + 1


def _write(path: Path, write) -> None:
    write_atomically(path, write)  # a reader sees the whole entry or none; parallel writers each their own file

"""A sweep's shared work, done once: tokenized text and the untrained model's scores.

Jobs of a sweep that read the same texts with the same tokenizer, and start from a model that
computes the same function, would tokenize and score the same baseline again and again. Each
result is kept on disk under a key that hashes everything it depends on, so it is reused only
when nothing that affects it changed:

- tokens: the texts themselves, the tokenizer's whole definition and the separator;
- the baseline (every split's metrics before training, and the samples before it): the tokens
  scored, the objective and evaluation settings, the device and precision, and the model's
  *function*: its logits on the first sequence of every split, bit for bit, after the strategy
  was applied. LoRA starts as the base model plus exact zeros and shares the baseline of full
  fine-tuning; `scratch`, DoRA (whose norm is recomputed in another order) or another `init_from`
  compute their own.

Entries are written atomically (parallel jobs may race to write the same one; either copy is
right) and read with `torch.load(weights_only=True)` or as JSON: nothing executable is read.
The folder is `<sweep>/.cache` in a sweep (`cache.dir` moves it; `cache.enabled=false` turns it off).
"""

import contextlib
import hashlib
import json
import os
import platform
import tempfile
from pathlib import Path

import torch

_folder: Path | None = None
_stats: dict = {}


def start(folder: Path | None) -> dict:
    """From now on, reuse and keep results in `folder` (None: compute everything). Returns the hit/miss counts."""
    global _folder, _stats
    _folder, _stats = (Path(folder) if folder is not None else None), {}
    if _folder is not None:
        _folder.mkdir(parents=True, exist_ok=True)
    return _stats


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
    if path.is_file():
        kept = torch.load(path, weights_only=True)
        _count("tokens", "hits")
        return kept["ids"].tolist(), kept["starts"].tolist()
    ids, starts = compute()
    _write(path, lambda f: torch.save({"ids": torch.tensor(ids), "starts": torch.tensor(starts)}, f))
    _count("tokens", "misses")
    return ids, starts


@torch.no_grad()
def model_function(model, splits: dict, hardware, length: int = 64) -> str:
    """What the model computes, as a hash: its logits on the first `length` tokens of each split's first sequence."""
    was_training = model.training
    model.eval()
    h = []
    for name in sorted(splits):
        if name == "train" or not len(splits[name]):
            continue
        ids = splits[name].get(0)[0][:length].unsqueeze(0).to(hardware.device)
        with hardware.autocast():
            # no cache: one built layer by layer would make compiled blocks (hardware.compile) compile once a layer
            h.append(digest(model(input_ids=ids, use_cache=False).logits.float()))
    model.train(was_training)
    return digest(h)


def baseline(key: dict, compute) -> tuple[dict, bool]:
    """compute() -> a JSON-able result, or the one an earlier job kept under the same key; and whether it was kept."""
    if _folder is None:
        return compute(), False
    path = _folder / f"baseline-{digest(key)}.json"
    if path.is_file():
        _count("baseline", "hits")
        return json.loads(path.read_text()), True
    result = compute()
    _write(path, lambda f: f.write(json.dumps(result).encode()))
    (_folder / f"{path.stem}.key.json").write_text(json.dumps(key, indent=1, default=str))  # what it depends on
    _count("baseline", "misses")
    return result, False


def environment() -> dict:
    """What every entry depends on beyond its inputs: the code that made it and the libraries it ran on."""
    import transformers

    here = Path(__file__).resolve().parent
    code = [
        p.read_bytes() for folder in ("data", "objectives", "evaluation") for p in sorted((here / folder).glob("*.py"))
    ]
    return {"code": digest(*(hashlib.sha256(c).hexdigest() for c in code)), "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}  # fmt: skip


def _count(kind: str, outcome: str) -> None:
    _stats.setdefault(kind, {"hits": 0, "misses": 0})[outcome] += 1


def _write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o644)  # as any file the job writes: others of the sweep (or the cluster) read it
        os.replace(tmp, path)  # atomic: a reader sees the whole entry or none
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

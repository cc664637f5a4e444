"""Pretrain the tiny model on general English: `python -m transfer.tiny.build [--shared ../shared]`.

Deterministic: the same corpus files, settings and machine give the same bytes (the
manifest keeps a SHA-256 of each corpus and of the weights). The corpora (SOURCES.md):
- the Python documentation's prose, the `train` topics only (PSF licence; ships with CPython):
  the `heldout` topics stay unseen, the default forgetting probe (eval/probes=python_docs);
- Tiny Shakespeare's training split (public domain), from ../shared/datasets/tiny_shakespeare:
  its validation and test splits stay unseen (eval/probes=shakespeare).
The weights are written in fp16 (under 2 MB); `model=tiny` loads them into its dtype.
"""

import argparse
import hashlib
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

from transfer.config.model import TinyModelConfig
from transfer.data.blocks import text_blocks
from transfer.data.sources import python_docs_prose
from transfer.fmt import reader_may_leave
from transfer.models.load import TINY_MANIFEST, TINY_WEIGHTS, build_model, byte_tokenizer, tiny_config

SHAKESPEARE = "datasets/tiny_shakespeare/train.jsonl"


def corpora(shared: Path | None) -> dict[str, list[str]]:
    found = {"python_docs_train": python_docs_prose("train")}
    if shared is not None:
        path = shared / SHAKESPEARE
        if not path.is_file():
            raise SystemExit(f"error: --shared {shared}: no {SHAKESPEARE} there")
        found["tiny_shakespeare_train"] = [json.loads(line)["text"] for line in path.read_text().splitlines() if line]
    return found


def digest(texts: list[str]) -> str:
    return hashlib.sha256("\x00".join(texts).encode()).hexdigest()


def pretrain(texts: list[str], steps: int, block_size: int = 256, batch: int = 16, lr: float = 3e-3,
             seed: int = 0, log_every: int = 50) -> tuple[torch.nn.Module, list[dict]]:  # fmt: skip
    """AdamW, warm-up then cosine to a tenth, on random whole blocks of the joined texts; seeded."""
    tokenizer = byte_tokenizer()
    model = build_model(tiny_config(TinyModelConfig(), tokenizer), seed=seed)
    seqs = text_blocks(texts, tokenizer, block_size, tokenizer.eos_token_id, keep_partial=False)
    blocks = seqs.ids.view(-1, block_size)  # whole blocks, one after another
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, steps // 20)

    def schedule(s: int) -> float:  # warm-up, then cosine from 1 to 0.1
        if s < warmup:
            return (s + 1) / warmup
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    curve, clock, model = [], time.perf_counter(), model.train()
    for step in range(1, steps + 1):
        rows = blocks[torch.randint(len(blocks), (batch,), generator=generator)]
        loss = model(input_ids=rows, labels=rows).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % log_every == 0 or step == steps:
            curve.append({"step": step, "loss": loss.item()})
            rate = step * batch * block_size / (time.perf_counter() - clock)
            print(f"step {step}/{steps}  loss {loss.item():.4f}  {rate:,.0f} tokens/s", file=sys.stderr, flush=True)
    return model.eval(), curve


def save(model, out: Path) -> str:
    from safetensors.torch import save_file

    state = {
        k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"
    }  # fmt: skip  (tied to the embeddings)
    save_file(state, str(out), metadata={"format": "pt"})
    return hashlib.sha256(out.read_bytes()).hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m transfer.tiny.build", description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=os.environ.get("TRANSFER_SHARED"),
                        help="the shared/ folder holding Tiny Shakespeare (default: $TRANSFER_SHARED)")  # fmt: skip
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--threads", type=int, default=1, help="torch threads: part of what makes the bytes the same")
    parser.add_argument("--out", type=Path, default=TINY_WEIGHTS)
    args = parser.parse_args(argv)
    if args.shared is None:
        parser.error("--shared (or TRANSFER_SHARED) is needed: Tiny Shakespeare is half the corpus")
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    found = corpora(Path(args.shared))
    texts = [t for name in sorted(found) for t in found[name]]
    clock = time.perf_counter()
    model, curve = pretrain(texts, args.steps)
    sha = save(model, args.out)
    manifest = {
        "weights": args.out.name, "weights_sha256": sha, "dtype": "float16", "steps": args.steps,
        "threads": args.threads, "seconds": round(time.perf_counter() - clock, 1), "torch": torch.__version__,
        "python": platform.python_version(),  # the Python documentation's text follows it
        "command": "python -m transfer.tiny.build " + " ".join(argv if argv is not None else sys.argv[1:]),
        "corpora": {name: {"documents": len(t), "characters": sum(map(len, t)), "sha256": digest(t)}
                    for name, t in found.items()},
        "loss_curve": curve,
    }  # fmt: skip
    (TINY_MANIFEST if args.out == TINY_WEIGHTS else args.out.with_suffix(".json")).write_text(
        json.dumps(manifest, indent=2) + "\n"
    )
    print(json.dumps({k: manifest[k] for k in ("weights_sha256", "steps", "seconds")}))
    return 0


if __name__ == "__main__":
    sys.exit(reader_may_leave(main))

"""Our perplexity pass against a plain `model(input_ids, labels=...)` loop over the same blocks.

    python benchmarks/eval_throughput.py                 # CPU: the reduced Qwen2-0.5B shape of trainer_vs_hf.py
    python benchmarks/eval_throughput.py --device cuda   # GPU: the full shape, bf16

Both run in evaluation mode under torch.no_grad on the same model and blocks; the two
alternate (A B, then B A) over the repeats and the table shows medians. The mean
losses must agree: every block scores the same number of tokens, so the plain
loop's mean of batch means equals our token-weighted mean up to rounding.
"""

import argparse
import statistics
import sys
import time
from datetime import date

import torch
from trainer_vs_hf import SHAPES, model_config

from transfer.config.compose import compose_config
from transfer.data.blocks import to_blocks
from transfer.evaluation.perplexity import perplexity
from transfer.models.load import build_model
from transfer.training.hardware import resolve

LOSS_RTOL = 1e-4


@torch.no_grad()
def plain_loop(model, blocks: torch.Tensor, batch_size: int, hardware) -> float:
    """What a researcher writes without us: mean of the model's own loss per batch."""
    model.eval()
    losses = []
    for start in range(0, len(blocks), batch_size):
        ids = blocks[start : start + batch_size].to(hardware.device)
        with hardware.autocast():
            losses.append(model(input_ids=ids, labels=ids).loss.item())
    return sum(losses) / len(losses)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--shape", choices=SHAPES, help="default: the device's")
    parser.add_argument("--blocks", type=int, default=32, help="evaluation blocks of the shape's sequence length")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("overrides", nargs="*", help="hardware overrides for ours, e.g. hardware.loss_chunk_tokens=0")
    args = parser.parse_args()
    shape = SHAPES[args.shape or args.device]
    hardware = resolve(compose_config([f"hardware.device={args.device}", f"hardware.precision={shape['precision']}",
                                       *args.overrides]).hardware)  # fmt: skip
    model = build_model(model_config(shape), seed=0).to(hardware.device)
    ids = torch.randint(0, shape["vocab"], (args.blocks, shape["seq"]), generator=torch.Generator().manual_seed(0))
    blocks = to_blocks(ids.flatten().tolist(), shape["seq"], keep_partial=True)
    batch = shape["micro"] * 2
    tokens = args.blocks * (shape["seq"] - 1)  # scored tokens: every position but the first of a block

    def timed(fn):
        hardware.synchronize()
        started = time.perf_counter()
        loss = fn()
        hardware.synchronize()
        return tokens / (time.perf_counter() - started), loss

    runs = {
        "ours": lambda: perplexity(model, blocks, batch, hardware, pad_id=0)["loss"],
        "plain": lambda: plain_loop(model, ids, batch, hardware),
    }
    timed(runs["ours"])  # warm-up: first calls allocate and pick kernels
    results = {name: [] for name in runs}
    for r in range(args.repeats):
        for name in ("ours", "plain") if r % 2 == 0 else ("plain", "ours"):
            results[name].append(timed(runs[name]))
    tps = {name: statistics.median(t for t, _ in runs_) for name, runs_ in results.items()}
    loss = {name: runs_[0][1] for name, runs_ in results.items()}
    print(f"# {date.today()} · device {args.device} · {args.blocks} blocks of {shape['seq']} tokens, "
          f"batch {batch}, {shape['precision']}{' · ' + ' '.join(args.overrides) if args.overrides else ''} · "
          f"{args.repeats} repeats, medians\n")  # fmt: skip
    print("| ours tok/s | plain loop tok/s | ours/plain | ours loss | plain loss |\n|---|---|---|---|---|")
    print(f"| {tps['ours']:,.0f} | {tps['plain']:,.0f} | {tps['ours'] / tps['plain']:.2f} | "
          f"{loss['ours']:.5f} | {loss['plain']:.5f} |")  # fmt: skip
    if abs(loss["ours"] - loss["plain"]) > LOSS_RTOL * abs(loss["plain"]):
        sys.exit(f"LOSSES DISAGREE beyond {LOSS_RTOL:g} (relative)")


if __name__ == "__main__":
    from transfer.fmt import reader_may_leave

    sys.exit(reader_may_leave(main))

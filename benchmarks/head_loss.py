"""The head and the training loss alone: our fused loss against Liger's and autograd's, on the same tensors.

    python benchmarks/head_loss.py --device cuda     # Qwen2-0.5B's head (896 x 151,936), 4 x 1,024 tokens, bf16
    python benchmarks/head_loss.py                   # CPU: 512 tokens, fp32 (Liger's kernels need a GPU)
    TRITON_INTERPRET=1 python benchmarks/head_loss.py --tokens 64 --vocab 1000 --liger   # Liger in Triton's interpreter

Each way computes the summed next-token cross-entropy of `tokens` hidden states through the head and both
gradients (the hidden states' and the head's), as one training step does:
- `autograd`: the whole logits, `F.cross_entropy`, autograd's backward pass (hardware.loss_chunk_tokens=0);
- `ours`: transfer.training.loss's fused loss, chunks of `--chunk` tokens, the gradients made in the forward pass;
- `liger`: liger-kernel's fused linear cross-entropy (hardware.kernels=liger).
The ways alternate over the repeats; the table has medians, the peak memory above the inputs', and each way's
loss and gradients against ours'. The script exits non-zero when they disagree.
"""

import argparse
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from transfer.data.sequences import IGNORE  # noqa: E402
from transfer.training.hardware import AUTOCAST_DTYPES, Hardware  # noqa: E402
from transfer.training.loss import _FusedHeadLoss, _loss, liger_head_loss  # noqa: E402

# How far a way's loss and gradients may lie from ours (relative; the gradients' by norm), by precision. fp32: the
# same sums in another order (measured on the CPU: the losses equal, the gradients within 2.4e-7, and Liger's in
# Triton's interpreter within 1.0e-7); bf16 autocast: logits rounded to 8 bits of mantissa in some ways only.
TOLERANCES = {"fp32": {"loss": 1e-6, "gradients": 1e-5}, "bf16": {"loss": 2e-3, "gradients": 3e-2}}

# the three as training calls them (transfer/loss.py)
WAYS = {
    "autograd": lambda hidden, weight, targets, chunk: _loss(hidden @ weight.T, targets),
    "ours": _FusedHeadLoss.apply,
    "liger": lambda hidden, weight, targets, chunk: liger_head_loss(hidden, weight, targets),
}


def step(way, hidden, weight, targets, hardware, chunk):
    """One forward and backward pass: (loss, the hidden states' gradient, the head's gradient); the inputs are left
    without gradients, so that each pass starts from the inputs alone."""
    with hardware.autocast():
        loss = WAYS[way](hidden, weight, targets, chunk)
    loss.backward()
    grads = hidden.grad, weight.grad
    hidden.grad = weight.grad = None
    return loss.detach(), *grads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--tokens", type=int, help="default: 4,096 on cuda, 512 on cpu")
    parser.add_argument("--hidden", type=int, default=896)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--chunk", type=int, default=4096, help="our chunk (hardware.loss_chunk_tokens)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--liger", action="store_true", help="include Liger on the CPU (with TRITON_INTERPRET=1)")
    args = parser.parse_args()
    device = torch.device(args.device)
    precision = "bf16" if device.type == "cuda" else "fp32"
    hardware = Hardware(device, precision)
    tokens = args.tokens or (4096 if device.type == "cuda" else 512)
    ways = ["autograd", "ours"] + (["liger"] if device.type == "cuda" or args.liger else [])

    generator = torch.Generator().manual_seed(0)
    # the decoder's output in autocast's dtype; the head's master weights in float32, as in training
    dtype = AUTOCAST_DTYPES[precision] or torch.float32
    hidden = torch.randn(tokens, args.hidden, generator=generator).to(device, dtype).requires_grad_()
    weight = (torch.randn(args.vocab, args.hidden, generator=generator) * args.hidden**-0.5).to(device)
    weight.requires_grad_()
    targets = torch.randint(0, args.vocab, (tokens,), generator=generator).to(device)
    targets[: tokens // 8] = IGNORE  # a prompt's positions, unscored

    seconds, peaks, results = {w: [] for w in ways}, {}, {}
    for way in ways:  # once each, untimed: kernels chosen and compiled, the memory measured alone
        step(way, hidden, weight, targets, hardware, args.chunk)
        sync(device)
        base = resident(hardware)
        hardware.reset_peak_memory()
        out = step(way, hidden, weight, targets, hardware, args.chunk)
        sync(device)
        peaks[way] = hardware.peak_memory()["bytes"] - base
        results[way] = [t.to("cpu", copy=True) for t in out]
        del out
    for r in range(args.repeats):
        for way in ways if r % 2 == 0 else ways[::-1]:
            sync(device)
            start = time.perf_counter()
            step(way, hidden, weight, targets, hardware, args.chunk)
            sync(device)
            seconds[way].append(time.perf_counter() - start)
        print(f"  repeat {r + 1}/{args.repeats}", file=sys.stderr, flush=True)

    print(f"# {date.today()} · device {args.device} · {tokens} tokens, hidden {args.hidden}, vocabulary "
          f"{args.vocab:,}, {precision}, our chunk {args.chunk} · {args.repeats} repeats, medians\n")  # fmt: skip
    print("| way | ms | speed vs ours | peak MiB above the inputs | vs ours | loss | rel. diff of the gradients |")
    print("|---|---|---|---|---|---|---|")
    ours_ms, ours_peak = statistics.median(seconds["ours"]) * 1e3, peaks["ours"]
    tolerance, disagree = TOLERANCES[precision], []
    for way in ways:
        ms = statistics.median(seconds[way]) * 1e3
        loss, grads = results[way][0], results[way][1:]
        pairs = zip(grads, results["ours"][1:], strict=True)
        diff = max(float((g.float() - o.float()).norm() / o.float().norm()) for g, o in pairs)
        if abs(float(loss) - float(results["ours"][0])) > tolerance["loss"] * abs(float(results["ours"][0])):
            disagree.append(f"{way} (loss {float(loss)!r} against {float(results['ours'][0])!r})")
        elif diff > tolerance["gradients"]:
            disagree.append(
                f"{way} (gradients {diff:.2e} apart, relative; allowed in {precision}: {tolerance['gradients']})"
            )
        print(f"| {way} | {ms:.2f} | {ours_ms / ms:.2f} | {peaks[way] / 2**20:,.1f} | "
              f"{peaks[way] / ours_peak if ours_peak > 0 else float('nan'):.2f} | {float(loss):.4f} | {diff:.2e} |")  # fmt: skip
    if disagree:
        sys.exit(f"losses or gradients disagree with ours: {', '.join(disagree)}")
    print(
        f"\nlosses and gradients agree with ours (within {tolerance['loss']:g} and {tolerance['gradients']:g}, relative)"
    )


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def resident(hardware) -> int:
    """What is held before a pass: the inputs (CUDA: allocated bytes; CPU: the resident set)."""
    if hardware.device.type == "cuda":
        return torch.cuda.memory_allocated(hardware.device)
    from transfer.training.hardware import proc_bytes

    return proc_bytes("/proc/self/status", "VmRSS") or 0


if __name__ == "__main__":
    from transfer.fmt import reader_may_leave

    sys.exit(reader_may_leave(main))

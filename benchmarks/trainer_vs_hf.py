"""Our trainer against transformers.Trainer on identical work: `make bench`.

    python benchmarks/trainer_vs_hf.py                  # CPU: reduced Qwen2-0.5B shape, fp32
    python benchmarks/trainer_vs_hf.py --device cuda    # GPU: the full Qwen2-0.5B shape, bf16, seq 1024, + MFU
    python benchmarks/trainer_vs_hf.py --device cuda --micro 16 --rows full   # another micro-batch
    python benchmarks/trainer_vs_hf.py --device cuda hardware.compile=true    # a speed lever of ours (--hf-compile: HF's)
    python benchmarks/trainer_vs_hf.py --device cuda hardware.kernels=liger --hf-liger   # Liger's kernels in both
    python benchmarks/trainer_vs_hf.py --shape cpu-small --model ../shared/models/stories260k   # a real pretrained model
    python benchmarks/trainer_vs_hf.py --model <qwen folder> --rows lora --hf-return-freed   # the allocator in both

Same model (Qwen2 widths, random weights, seed 0; or a real pretrained one), same token blocks in the same
order, micro-batch, sequence length, precision, optimizer (AdamW, torch's fused kernel
as in HF's default `adamw_torch_fused`, constant rate, clipping 1.0, no decay on
biases and norms), strategy and number of optimizer steps.
Each measurement runs in a fresh process (so peak memory is that run's), the two
trainers alternate (A B, then B A) over the repeats so that machine drift cancels,
and the table shows medians. Warm-up steps are excluded from the timing. The final
training losses must agree: equal work, equal result.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date

# Final losses of the two trainers may differ by this much (relative): same data,
# order and optimizer, but different kernels summing in different orders.
LOSS_RTOL = 2e-3
ROWS = {
    "full": ["strategy=full"],
    "lora": ["strategy=lora", "strategy.dropout=0"],  # no dropout: the two would draw different masks
    "freeze_lower": ["strategy=freeze_lower", "strategy.frozen_blocks=0.5"],
    "adapter": ["strategy=adapter", "strategy.trained_blocks=1"],
}
TINY_WIDTHS = dict(hidden=128, inter=384, heads=4, kv=2)  # conf/model/tiny.yaml
SHAPES = {
    # Qwen2-0.5B widths, fewer blocks and a smaller vocabulary: a few minutes on 2 cores
    "cpu": dict(layers=2, vocab=8192, seq=128, micro=2, steps=8, warmup=2, precision="fp32"),
    # the same with Qwen2's whole 151,936-token vocabulary: where the logits dominate memory
    "cpu-vocab": dict(layers=2, vocab=151_936, seq=128, micro=4, steps=4, warmup=1, precision="fp32"),
    # the `tiny` model's widths (its vocabulary unpadded) at the default run's batch: where the work around the kernels shows
    "cpu-small": dict(layers=4, vocab=257, seq=128, micro=8, steps=200, warmup=20, precision="fp32", **TINY_WIDTHS),
    # the full Qwen2-0.5B shape
    "cuda": dict(layers=24, vocab=151_936, seq=1024, micro=4, steps=30, warmup=5, precision="bf16"),
    # for the test that keeps this script from rotting
    "tiny": dict(
        layers=1, vocab=512, seq=32, micro=2, steps=4, warmup=1, precision="fp32", hidden=64, inter=128, heads=4, kv=2
    ),  # fmt: skip
}
BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16, SXM


def model_config(shape: dict):
    from transformers import Qwen2Config

    return Qwen2Config(
        hidden_size=shape.get("hidden", 896), intermediate_size=shape.get("inter", 4864),
        num_attention_heads=shape.get("heads", 14), num_key_value_heads=shape.get("kv", 2),
        num_hidden_layers=shape["layers"], vocab_size=shape["vocab"], max_position_embeddings=max(2048, shape["seq"]),
        tie_word_embeddings=True,
    )  # fmt: skip


def overrides(row: str, shape: dict, device: str, extra: list[str]) -> list[str]:
    return [
        *ROWS[row], f"micro_batch_size={shape['micro']}", "grad_accum_steps=1", f"block_size={shape['seq']}",
        f"max_steps={shape['steps']}", "eval_interval=0", "log_interval=1", "optimizer.lr=1e-4",
        "optimizer.weight_decay=0.01", "optimizer.warmup_ratio=0", "optimizer.schedule=constant",
        "optimizer.grad_clip=1.0", f"hardware.device={device}", f"hardware.precision={shape['precision']}",
        "checkpoint.enabled=false", *extra,
    ]  # fmt: skip


class StepClock:
    """A metric logger (transfer.training.loggers): notes when each optimizer step has finished, and its loss;
    moves the profiler, if any, on to the next step."""

    def __init__(self, hardware, profiler=None):
        self.hardware, self.profiler, self.times, self.losses = hardware, profiler, {}, {}

    def scalars(self, values, step):
        if "train/loss" in values:
            self.tick(step)
            self.losses[step] = values["train/loss"]

    def tick(self, step: int) -> None:
        self.hardware.synchronize()
        self.times[step] = time.perf_counter()
        if self.profiler is not None:
            self.profiler.step()


def worker(impl: str, row: str, shape_name: str, args) -> dict:
    """One measurement, in its own process; `args.profile` > 0: under torch's profiler, with its top operations."""
    import contextlib

    import torch
    from transformers import AutoModelForCausalLM

    from transfer.config.compose import compose_config
    from transfer.data.blocks import to_blocks
    from transfer.models.anatomy import parameter_report
    from transfer.models.load import build_model, byte_tokenizer
    from transfer.objectives import build_objective
    from transfer.strategies import apply_strategy
    from transfer.train import train
    from transfer.training.hardware import resolve, return_freed_memory
    from transfer.training.speed import apply_transforms

    device, profile = args.device, args.profile
    shape = {**SHAPES[shape_name], **({"micro": args.micro} if args.micro else {})}
    cfg = compose_config(overrides(row, shape, device, args.ours_overrides if impl == "ours" else []))
    hardware = resolve(cfg.hardware)
    if args.model:  # a real pretrained model: its own architecture, widths, vocabulary and weights
        base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        widths = base.config
        shape.update(layers=widths.num_hidden_layers, vocab=widths.vocab_size, hidden=widths.hidden_size,
                     inter=widths.intermediate_size, heads=widths.num_attention_heads, kv=widths.num_key_value_heads)  # fmt: skip
    else:
        base = build_model(model_config(shape), seed=0)
    torch.manual_seed(0)  # LoRA's A matrices start random: the same in both trainers' processes
    model, _ = apply_strategy(base, cfg.strategy, seed=0)
    params = parameter_report(model)
    # glibc's fixed mmap threshold: ours as a run sets it (hardware.return_freed_memory), HF's when asked (the same
    # setting on both sides tells the allocator's share from the trainer's)
    wanted = cfg.hardware.return_freed_memory if impl == "ours" else args.hf_return_freed
    freed = return_freed_memory() if wanted else False
    transforms = apply_transforms(model, cfg)  # ours' hardware.compile / attention / kernels / checkpointing
    model.to(hardware.device)
    n_blocks = shape["steps"] * shape["micro"]
    ids = torch.randint(0, shape["vocab"], (n_blocks, shape["seq"]), generator=torch.Generator().manual_seed(0))
    blocks = to_blocks(ids.flatten().tolist(), shape["seq"], keep_partial=False)
    objective = build_objective(cfg, byte_tokenizer())  # the language-modelling loss; its data is made here
    stream = objective.stream(blocks, cfg.seed, 0, shape["micro"] * cfg.grad_accum_steps)
    order = [stream.next() for _ in range(n_blocks)]  # the order our trainer draws them in
    warm, last = shape["warmup"], shape["steps"]
    profiler = None
    if profile:  # the timed steps only: the warm-up ones are waited out
        kinds = [torch.profiler.ProfilerActivity.CPU] + (
            [torch.profiler.ProfilerActivity.CUDA] if device == "cuda" else []
        )
        profiler = torch.profiler.profile(
            activities=kinds, schedule=torch.profiler.schedule(wait=warm, warmup=0, active=last - warm)
        )
    hardware.reset_peak_memory()
    clock = StepClock(hardware, profiler)
    started = time.perf_counter()
    with profiler if profiler is not None else contextlib.nullcontext():
        if impl == "ours":
            train(model, objective, {"train": blocks}, cfg, hardware, logger=clock)
        else:
            hf_train(model, blocks, order, cfg, shape, clock, args.hf_compile, args.hf_liger)
    seconds = clock.times[last] - clock.times[warm]
    tokens = (last - warm) * shape["micro"] * shape["seq"]
    result = {
        "impl": impl, "row": row, "tokens_per_second": tokens / seconds, "peak_memory_bytes": hardware.peak_memory()["bytes"],
        "final_loss": clock.losses[last], "trainable": params["trainable"], "total": params["total"],
        "loss_chunk_tokens": cfg.hardware.loss_chunk_tokens, "transforms": transforms,
        # from calling the trainer to its first step's end: set-up, allocations, kernel choices, compiling
        "first_step_seconds": clock.times[1] - started, "shape": shape, "return_freed_memory": bool(freed),
    }  # fmt: skip
    if profiler is not None:
        by = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
        result["profile"] = profiler.key_averages().table(sort_by=by, row_limit=profile, max_name_column_width=60)
    if hardware.device.type == "cuda":
        # 6 N per token for forward and backward of the weights (2 N for frozen ones' forward only
        # is not subtracted: MFU against the model, as commonly reported), plus attention
        n, layers, hidden, seq = params["total"], shape["layers"], shape.get("hidden", 896), shape["seq"]
        flops_per_token = 6 * n + 12 * layers * hidden * seq
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)
        result["mfu"] = flops_per_token * result["tokens_per_second"] / (peak * 1e12) if peak else None
    return result


def hf_train(model, blocks, order, cfg, shape, clock, hf_compile: bool, hf_liger: bool) -> None:
    from torch.utils.data import Dataset, SequentialSampler
    from transformers import Trainer, TrainerCallback, TrainingArguments

    class Ordered(Dataset):
        def __len__(self):
            return len(order)

        def __getitem__(self, i):
            ids = blocks.get(order[i])[0]
            return {"input_ids": ids, "labels": ids}

    class SameOrderTrainer(Trainer):
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            clock.tick(state.global_step)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                clock.losses[state.global_step] = logs["loss"]

    opt = cfg.optimizer
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=shape["micro"], gradient_accumulation_steps=1,
            max_steps=shape["steps"], learning_rate=opt.lr, weight_decay=opt.weight_decay,
            adam_beta1=opt.betas[0], adam_beta2=opt.betas[1], adam_epsilon=opt.eps, max_grad_norm=opt.grad_clip,
            lr_scheduler_type="constant", warmup_steps=0, logging_steps=1, save_strategy="no", report_to=[],
            bf16=shape["precision"] == "bf16", use_cpu=cfg.hardware.device.value == "cpu", dataloader_num_workers=0,
            disable_tqdm=True, seed=cfg.seed, optim="adamw_torch_fused", torch_compile=hf_compile,
            use_liger_kernel=hf_liger,
        )  # fmt: skip
        SameOrderTrainer(model=model, args=args, train_dataset=Ordered(), callbacks=[Clock()]).train()


def measure(impl: str, row: str, shape: str, args, profile: int = 0) -> dict:
    cmd = [sys.executable, __file__, "--worker", impl, "--row", row, "--shape", shape, "--device", args.device,
           *(["--micro", str(args.micro)] if args.micro else []), *(["--hf-compile"] if args.hf_compile else []),
           *(["--hf-liger"] if args.hf_liger else []), *(["--hf-return-freed"] if args.hf_return_freed else []),
           *(["--model", args.model] if args.model else []),
           "--profile", str(profile), *args.ours_overrides]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{impl}/{row} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--shape", choices=SHAPES, help="default: the device's")
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--micro", type=int, help="micro-batch size for both trainers (default: the shape's)")
    parser.add_argument(
        "ours_overrides", nargs="*", help="overrides for our runs only, e.g. hardware.loss_chunk_tokens=0"
    )
    parser.add_argument("--model", help="a real pretrained model's folder (its widths replace the shape's)")
    parser.add_argument("--hf-compile", action="store_true", help="HF's Trainer with torch_compile=True (whole model)")
    parser.add_argument("--hf-liger", action="store_true",
                        help="HF's Trainer with use_liger_kernel=True (ours: the override hardware.kernels=liger)")  # fmt: skip
    parser.add_argument("--hf-return-freed", action="store_true",
                        help="HF's process with glibc's fixed mmap threshold too (ours: hardware.return_freed_memory)")  # fmt: skip
    parser.add_argument(
        "--profile", type=int, default=0, metavar="N",
        help="then one more run of each under torch's profiler: its N most time-consuming operations",
    )  # fmt: skip
    parser.add_argument("--worker", choices=["ours", "hf"], help=argparse.SUPPRESS)
    parser.add_argument("--row", help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = args.shape or args.device
    if args.worker:
        print(json.dumps(worker(args.worker, args.row, shape, args)))
        return

    rows = args.rows.split(",")
    results = {(row, impl): [] for row in rows for impl in ("ours", "hf")}
    started = time.perf_counter()
    for r in range(args.repeats):
        for row in rows:
            for impl in ("ours", "hf") if r % 2 == 0 else ("hf", "ours"):  # A B, then B A
                results[row, impl].append(measure(impl, row, shape, args))
                last = results[row, impl][-1]  # the first repeat's first step is the one that compiles cold
                print(f"  repeat {r + 1}/{args.repeats} {row:12s} {impl:4s} {last['tokens_per_second']:10,.0f} tok/s, "
                      f"first step {last['first_step_seconds']:.3g} s", file=sys.stderr, flush=True)  # fmt: skip

    s = results[rows[0], "ours"][0]["shape"]  # the model's widths, with --model
    chunks = results[rows[0], "ours"][0]["loss_chunk_tokens"]
    freed = {impl: "on" if results[rows[0], impl][0]["return_freed_memory"] else "off" for impl in ("ours", "hf")}
    ours_extra = (
        f" · ours: loss_chunk_tokens={chunks}, freed memory returned {freed['ours']}"
        + (f", overrides {' '.join(args.ours_overrides)}" if args.ours_overrides else "")
        + (" · HF: torch_compile=True" if args.hf_compile else "")
        + (" · HF: use_liger_kernel=True" if args.hf_liger else "")
        + f" · HF: freed memory returned {freed['hf']}"
    )
    print(
        f"# {date.today()} · device {args.device} · shape {shape}: {s}"
        + (f" · model {args.model} (pretrained)" if args.model else "")
        + f"{ours_extra} · {args.repeats} repeats, medians\n"
    )
    head = ("| row | trainable | ours tok/s | HF tok/s | ours/HF | ours peak MiB | HF peak MiB | ours/HF | ours loss | "
            "HF loss | ours first step s | HF first step s |")  # fmt: skip
    print(head + (" ours MFU | HF MFU |" if args.device == "cuda" else ""))
    print("|" + "---|" * (head.count("|") - 1 + (2 if args.device == "cuda" else 0)))
    disagreements = []
    for row in rows:
        ours, hf = results[row, "ours"], results[row, "hf"]
        med = lambda runs, key: statistics.median(x[key] for x in runs)  # noqa: E731
        tps_o, tps_h = med(ours, "tokens_per_second"), med(hf, "tokens_per_second")
        mem_o, mem_h = med(ours, "peak_memory_bytes") / 2**20, med(hf, "peak_memory_bytes") / 2**20
        loss_o, loss_h = ours[0]["final_loss"], hf[0]["final_loss"]
        if abs(loss_o - loss_h) > LOSS_RTOL * abs(loss_h):
            disagreements.append(f"{row}: ours {loss_o:.6f} vs HF {loss_h:.6f}")
        line = (f"| {row} | {ours[0]['trainable']:,} | {tps_o:,.0f} | {tps_h:,.0f} | {tps_o / tps_h:.2f} | "
                f"{mem_o:,.0f} | {mem_h:,.0f} | {mem_o / mem_h:.2f} | {loss_o:.4f} | {loss_h:.4f} | "
                f"{med(ours, 'first_step_seconds'):.3g} | {med(hf, 'first_step_seconds'):.3g} |")  # fmt: skip
        if args.device == "cuda":
            line += f" {med(ours, 'mfu') or 0:.1%} | {med(hf, 'mfu') or 0:.1%} |"
        print(line)
    print(f"\n{time.perf_counter() - started:.0f} s in all; final losses agree within {LOSS_RTOL:g} (relative)"
          if not disagreements else f"\nFINAL LOSSES DISAGREE: {'; '.join(disagreements)}")  # fmt: skip
    for row in rows if args.profile else ():  # separate runs: the profiler's own cost stays out of the table above
        for impl in ("ours", "hf"):
            found = measure(impl, row, shape, args, profile=args.profile)
            print(f"\n## {row}, {impl}: the timed steps under torch's profiler\n\n```\n{found['profile']}```")
    if disagreements:
        sys.exit(1)


if __name__ == "__main__":
    from transfer.fmt import reader_may_leave

    sys.exit(reader_may_leave(main))

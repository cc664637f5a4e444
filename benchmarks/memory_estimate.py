"""The memory estimate against what a run holds: `python benchmarks/memory_estimate.py --device cuda`.

Each row is one real run (`python -m transfer`, a few steps) of a model of Qwen2-0.5B's
shape with random weights, saved once to a temporary folder, so that QLoRA quantizes real
weights as it would a hub model's; or, with `--model FOLDER`, of that real model (its own
tokenizer). Its record holds both figures: `memory_estimate`, made before a weight was read,
and `memory`, measured over the whole run (training and evaluation). The table shows their ratio.

On a GPU the measured figure is CUDA's `max_memory_allocated`, compared with the estimate's
`peak_bytes` (tensors alone). On a CPU it is the process's peak resident set (VmHWM), which
counts the interpreter, the libraries and the tokenizer too: compared with the estimate's
`resident_peak_bytes`, which adds the resident set measured when the estimate was made (the
`process` column). `--device cpu --shape cpu --model FOLDER` is the real Qwen2 on a CPU
(docs/benchmarks.md); tests/test_memory.py checks the tensors' part against the CPU
allocator's own count. `--shape tiny` is for the test that keeps this script from rotting.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

# What a row adds to the shared overrides: the strategies people compare, and checkpointing's saving.
ROWS = {
    "full": ["strategy=full"],
    "freeze_lower": ["strategy=freeze_lower"],
    "lora": ["strategy=lora"],
    "qlora": ["strategy=qlora"],
    "full+checkpointing": ["strategy=full", "hardware.gradient_checkpointing=true"],
    "lora+dpo": ["strategy=lora", "objective=dpo", "dataset=hh_rlhf_harmless"],
}
QWEN2_0_5B = dict(hidden=896, inter=4864, heads=14, kv=2, layers=24, vocab=151_936)
SHAPES = {
    "qwen2-0.5b": dict(**QWEN2_0_5B, seq=1024, micro=4),
    # a few minutes a row on 2 CPU cores: short blocks, a small evaluation, one generated token for the samples
    "cpu": dict(
        **QWEN2_0_5B,
        seq=128,
        micro=2,
        evaluation=["eval_batch_size=8", "eval.max_tokens=1024", "eval.max_new_tokens=1"],
    ),  # fmt: skip
    "tiny": dict(hidden=64, inter=128, heads=4, kv=2, layers=1, vocab=512, seq=32, micro=2),
}


def save_model(shape: dict, folder: Path) -> None:
    """Random weights of the shape, in bf16 (as the hub's Qwen2 checkpoints), with the byte-level tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from transfer.models.load import byte_tokenizer

    config = Qwen2Config(
        hidden_size=shape["hidden"], intermediate_size=shape["inter"], num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv"], num_hidden_layers=shape["layers"], vocab_size=shape["vocab"],
        max_position_embeddings=max(2048, shape["seq"]), tie_word_embeddings=True, dtype="bfloat16",
    )  # fmt: skip
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)


def run(row: str, folder: Path, shape: dict, device: str, out: Path, extra: list[str], random_weights: bool) -> dict:
    args = [
        sys.executable, "-m", "transfer", "model=local", f"model.name_or_path={folder}",
        f"model.tokenizer_from_json={str(random_weights).lower()}", f"hardware={device}", f"block_size={shape['seq']}",
        f"micro_batch_size={shape['micro']}", "grad_accum_steps=1", "max_steps=3", "eval_interval=0",
        *shape.get("evaluation", ["eval.max_tokens=16384"]), "eval/probes=[]", "checkpoint.enabled=false",
        f"hydra.run.dir={out}", *ROWS[row], *extra,
    ]  # fmt: skip
    proc = subprocess.run(args, capture_output=True, text=True)
    record = json.loads((out / "metrics.json").read_text()) if (out / "metrics.json").is_file() else {}
    if proc.returncode != 0 or record.get("status") != "completed":
        raise SystemExit(f"{row} failed:\n{proc.stderr[-3000:]}")
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    parser.add_argument("--shape", default="qwen2-0.5b", choices=SHAPES)
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--model", help="a real model's folder, instead of random weights of the shape's widths")
    parser.add_argument("overrides", nargs="*", help="for every run, e.g. hardware.loss_chunk_tokens=1024")
    args = parser.parse_args()
    shape = SHAPES[args.shape]
    started = time.perf_counter()
    lines, shared = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.model).expanduser() if args.model else Path(tmp) / "model"
        if not args.model:
            save_model(shape, folder)
        for row in args.rows.split(","):
            record = run(row, folder, shape, args.device, Path(tmp) / row, args.overrides, not args.model)
            line, shared[row] = table_row(row, record)
            lines.append(line)
            print(f"  {line} CPUs shared: {shared[row]}", file=sys.stderr, flush=True)
    measured = record["memory"]["kind"]
    print(f"# {date.today()} · device {args.device} · {args.model or f'shape {args.shape}'}: {shape} · 3 steps, "
          "bf16 where the GPU has it\n")  # fmt: skip
    print("| row | weights GiB | optimizer GiB | activations GiB | evaluation GiB | estimated peak B "
          "| measured peak B | measured/estimated |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(lines))
    print(
        f"\nCPUs shared with other work (the records' train.machine): {'; '.join(f'{k} {v}' for k, v in shared.items())}"
    )
    print(f"\n{time.perf_counter() - started:.0f} s in all; measured: {measured}")


def table_row(row: str, record: dict) -> tuple[str, str]:
    """The estimate's parts (GiB), its peak and the measured one (bytes), on a CPU the resident set's (the process's own
    memory when estimated in brackets); and whether the run shared its CPUs."""
    estimate, measured, gib = record["memory_estimate"], record["memory"]["bytes"], 2**30
    t, peak = estimate["training"], estimate.get("resident_peak_bytes", estimate["peak_bytes"])
    process = f" (process {estimate['process_bytes'] / gib:.3g} GiB)" if "process_bytes" in estimate else ""
    machine = record["train"].get("machine", {})
    shared = f"yes (load {machine['load_average_max']:.1f})" if machine.get("contended") else "no"
    return (
        f"| {row} | {t['weights'] / gib:.3g} | {t['optimizer'] / gib:.3g} | {t['activations'] / gib:.3g} | "
        f"{estimate['evaluation']['peak'] / gib:.3g} | {peak:,}{process} | {measured:,} | {measured / peak:.2f} |"
    ), shared


if __name__ == "__main__":
    from transfer.fmt import reader_may_leave

    sys.exit(reader_may_leave(main))

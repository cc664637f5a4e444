"""The memory estimate against what a run holds: `python benchmarks/memory_estimate.py --device cuda`.

Each row is one real run (`python -m transfer`, a few steps) of a model of Qwen2-0.5B's
shape with random weights, saved once to a temporary folder, so that QLoRA quantizes real
weights as it would a hub model's. Its record holds both figures: `memory_estimate`, made
before a weight was read, and `memory`, CUDA's `max_memory_allocated` over the whole run
(training and evaluation). The table shows their ratio.

On a CPU the measured figure is the process's peak resident set, which counts the
interpreter and the libraries too, so the ratio says little there; tests/test_memory.py
checks the estimate against the CPU allocator's own count instead. `--shape tiny` is for the
test that keeps this script from rotting.
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
SHAPES = {
    "qwen2-0.5b": dict(hidden=896, inter=4864, heads=14, kv=2, layers=24, vocab=151_936, seq=1024, micro=4),
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


def run(row: str, folder: Path, shape: dict, device: str, out: Path, extra: list[str]) -> dict:
    args = [
        sys.executable, "-m", "transfer", "model=local", f"model.name_or_path={folder}",
        "model.tokenizer_from_json=true", f"hardware={device}", f"block_size={shape['seq']}",
        f"micro_batch_size={shape['micro']}", "grad_accum_steps=1", "max_steps=3", "eval_interval=0",
        "eval.max_tokens=16384", "eval/probes=[]", "checkpoint.enabled=false", f"hydra.run.dir={out}",
        *ROWS[row], *extra,
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
    parser.add_argument("overrides", nargs="*", help="for every run, e.g. hardware.loss_chunk_tokens=1024")
    args = parser.parse_args()
    shape = SHAPES[args.shape]
    started = time.perf_counter()
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        save_model(shape, folder)
        for row in args.rows.split(","):
            record = run(row, folder, shape, args.device, Path(tmp) / row, args.overrides)
            estimate, measured = record["memory_estimate"], record["memory"]
            t, gib = estimate["training"], 2**30
            lines.append(
                f"| {row} | {t['weights'] / gib:.3g} | {t['optimizer'] / gib:.3g} | {t['activations'] / gib:.3g} | "
                f"{estimate['evaluation']['peak'] / gib:.3g} | {estimate['peak_bytes'] / gib:.3g} | "
                f"{measured['bytes'] / gib:.3g} | {estimate['peak_bytes'] / measured['bytes']:.2f} |"
            )
            print(f"  {row}: estimated {estimate['peak_bytes'] / gib:.3g} GiB, measured {measured['bytes'] / gib:.3g} "
                  f"GiB ({measured['kind']})", file=sys.stderr, flush=True)  # fmt: skip
    print(
        f"# {date.today()} · device {args.device} · shape {args.shape}: {shape} · 3 steps, bf16 where the GPU has it\n"
    )
    print("| row | weights GiB | optimizer GiB | activations GiB | evaluation GiB | estimated peak GiB "
          "| measured peak GiB | estimated/measured |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(lines))
    print(f"\n{time.perf_counter() - started:.0f} s in all; measured: {measured['kind']}")


if __name__ == "__main__":
    from transfer.fmt import reader_may_leave

    sys.exit(reader_may_leave(main))

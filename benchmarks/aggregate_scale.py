"""How long `make tables` takes on a big sweep: N generated job folders, timed.

    python benchmarks/aggregate_scale.py --jobs 1000

Each job folder gets a run record shaped like a real one (the numbers are random)
and Hydra's overrides.yaml; then reading, grouping and writing tables and plots
are timed separately. Nothing is asserted: the figures go into docs/benchmarks.md.
"""

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

from transfer.aggregate.jobs import read_jobs
from transfer.aggregate.output import write_tables
from transfer.aggregate.tables import comparison

STRATEGIES = ["full", "freeze_lower", "freeze_embeddings", "adapter", "lora", "dora", "ia3", "scratch"]


def fake_record(strategy: str, lr: str, seed: int, rng: random.Random) -> dict:
    before = 300 + rng.random()
    after = 20 + 100 * rng.random()
    curve = [{"step": s, "loss": 3 + rng.random(), "perplexity": 20 + rng.random()} for s in range(50, 301, 50)]
    return {
        "status": "completed" if rng.random() > 0.02 else "failed",
        "error": None,
        "choices": {
            "model": "tiny",
            "strategy": strategy,
            "dataset": "rust_concepts",
            "hardware": "cpu",
            "optimizer": "adamw",
        },
        "config": {"seed": seed, "model": {"name_or_path": None}, "optimizer": {"lr": float(lr)}},
        "params": {
            "total": 829_568,
            "trainable": rng.randrange(2_000, 829_568),
            "trainable_pct": 50.0,
            "tied_embeddings": True,
        },
        "train": {
            "seconds": 10 * rng.random(),
            "steps": 300,
            "tokens_per_second": 1e4 * rng.random(),
            "samples_per_second": 80 * rng.random(),
            "best_step": 300,
            "stop_reason": "max_steps",
            "checkpoint": {"bytes": 3_000_000},
            "validation_curve": curve,
        },  # fmt: skip
        "eval": {
            "baseline": {s: {"loss": 5.7, "perplexity": before} for s in ("validation", "test", "reference")},
            "final": {s: {"loss": 3.0, "perplexity": after} for s in ("validation", "test", "reference")},
            "change_pct": {s: 100 * (after / before - 1) for s in ("validation", "test", "reference")},
        },
        "memory": {"bytes": 600_000_000 + rng.randrange(10**8), "kind": "cpu_peak_rss"},
    }


def make_sweep(folder: Path, n_jobs: int) -> None:
    rng = random.Random(0)
    lrs = ["1e-4", "3e-4", "1e-3"]
    for i in range(n_jobs):
        strategy, lr, seed = STRATEGIES[i % 8], lrs[(i // 8) % 3], i // 24
        job = folder / str(i)
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(f"- strategy={strategy}\n- optimizer.lr={lr}\n- seed={seed}\n")
        (job / "metrics.json").write_text(json.dumps(fake_record(strategy, lr, seed, rng)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sweep = Path(tmp) / "sweep"
        make_sweep(sweep, args.jobs)
        t0 = time.perf_counter()
        jobs = read_jobs([sweep])
        t1 = time.perf_counter()
        table = comparison(jobs)
        t2 = time.perf_counter()
        write_tables(jobs, table, sweep / "tables")
        t3 = time.perf_counter()
    print(f"{args.jobs} jobs -> {len(table)} table rows")
    print(
        f"read {t1 - t0:.2f} s | group {t2 - t1:.2f} s | write tables and plots {t3 - t2:.2f} s | total {t3 - t0:.2f} s"
    )


if __name__ == "__main__":
    from transfer.fmt import reader_may_leave

    sys.exit(reader_may_leave(main))

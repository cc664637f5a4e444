"""Start-up overhead: seconds from `python -m transfer` to the first training step, less model loading.

    python benchmarks/startup.py --repeats 3 [OVERRIDE ...]

Runs the default experiment on `tiny` for one step, each time in a fresh process,
and reads the `timing` section the run record keeps: the memory estimate, model load, data
load, the baseline evaluation and samples, and the rest (imports, config, set-up), which is
the overhead. Medians over the repeats.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

PARTS = ("startup_overhead", "memory_estimate", "model_load", "data_load", "baseline_eval_and_samples", "to_first_step")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "overrides", nargs="*", help="more overrides for each run (the overhead does not depend on them)"
    )
    args = parser.parse_args()
    timings, walls = [], []
    for r in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            started = time.perf_counter()
            cmd = [sys.executable, "-m", "transfer", "max_steps=1", "checkpoint.enabled=false",
                   *args.overrides, f"hydra.run.dir={tmp}/run"]  # fmt: skip
            proc = subprocess.run(cmd, capture_output=True, text=True)
            walls.append(time.perf_counter() - started)
            if proc.returncode != 0:
                sys.exit(proc.stderr[-3000:])
            timings.append(json.loads((Path(tmp) / "run" / "metrics.json").read_text())["timing"])
        print(f"  repeat {r + 1}/{args.repeats}: overhead {timings[-1]['startup_overhead']:.2f} s", file=sys.stderr)
    print(f"# {date.today()} · `python -m transfer max_steps=1` on tiny · {args.repeats} fresh processes, medians\n")
    print("| " + " | ".join(PARTS) + " | whole run |\n|" + "---|" * (len(PARTS) + 1))
    cells = [f"{statistics.median(t[k] for t in timings):.2f} s" for k in PARTS]
    print("| " + " | ".join(cells) + f" | {statistics.median(walls):.2f} s |")


if __name__ == "__main__":
    from transfer.fmt import reader_may_leave

    sys.exit(reader_may_leave(main))

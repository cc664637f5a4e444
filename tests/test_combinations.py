"""Where features meet: every objective family across a sweep with its cache, a kill and a resume, init_from, a
peft and a non-peft strategy, and export --merge --check, as one matrix whose every cell must hold.

The families are `lm`, `sft` with choices, `dpo` (a reference model) and `simpo` (none). Each runs a sweep of
`strategy=full,lora` (the sweep turns the shared cache on), and each but the first starts from the previous
family's run: lm (full) -> sft (from lm's full job) -> dpo (from sft's LoRA job) -> simpo (from dpo's LoRA job), a
chain of init_from three deep whose runs saved only what they trained. Every figure is checked against another
computation of it:

- cache: the LoRA job reuses the full job's baseline (LoRA starts as the base model), and it is the one a single
  run of the same job computes without the cache, to the bit;
- resume: that single run, killed after its first checkpoint and resumed, ends with the sweep job's losses;
- init_from: the forgetting probe before training equals the parent's after its training (the same weights,
  whatever the objective), and the record links the whole chain;
- strategy: both jobs complete, LoRA trains fewer parameters than full fine-tuning;
- export: each job's model, exported and merged, gives the run's recorded validation figures (--check).

One test, so that its runs are made once in one process of the suite; it prints the matrix with each cell's result.
The runs are made in this process, as the CLI's job() makes each (a sweep's jobs one after another, sharing the sweep's
cache), except the run that is killed: killing needs a process of its own. What the command line and Hydra's
launcher add to a sweep is tested in test_cache.py and test_launchers.py.
"""

import json
import random
from pathlib import Path

import pytest
from conftest import kill_after_first_checkpoint, run_here

from transfer.export import main as export_main
from transfer.record import read_record

COMMON = [
    "max_steps=4", "eval_interval=2", "checkpoint.interval=2", "block_size=64", "micro_batch_size=4",
    "eval_batch_size=16", "eval.max_tokens=512", "eval.probes.python_docs.max_tokens=512", "eval.max_new_tokens=1",
    "hardware.estimate_memory=false", "log_interval=1", "tables_after_sweep=false",
]  # fmt: skip
FAMILIES = ["lm", "sft", "dpo", "simpo"]
PARENT = {"sft": ("lm", 0), "dpo": ("sft", 1), "simpo": ("dpo", 1)}  # which job of which family each starts from
CELLS = ["sweep + cache", "single run, killed, resumed", "init_from", "full and lora", "export --merge --check"]
METRIC = {"lm": "loss", "sft": "accuracy", "dpo": "reward_accuracy", "simpo": "reward_accuracy"}


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def family_args(family: str, data: Path) -> list[str]:
    rng = random.Random(0)
    if family == "lm":
        return []
    splits = {"train": 24, "validation": 8, "test": 4}
    if family == "sft":
        files = {s: _jsonl(data / f"sft-{s}.jsonl", [
            {"prompt": f"Is {k} even?", "completion": "Yes" if k % 2 == 0 else "No"}
            for k in (rng.randrange(10, 99) for _ in range(n))]) for s, n in splits.items()}  # fmt: skip
        extra = ["objective=sft", "dataset.choices=[Yes,No]", "objective.select=accuracy"]
    else:
        files = {s: _jsonl(data / f"pairs-{s}.jsonl", [
            {"prompt": f"Is {rng.randrange(10, 99)} a number?", "chosen": " Yes.", "rejected": " No."}
            for _ in range(n)]) for s, n in splits.items()}  # fmt: skip
        extra = [f"objective={family}", "objective.select=reward_accuracy", "micro_batch_size=2"]
    return ["dataset=text_files", *(f"dataset.{s}_files=[{f}]" for s, f in files.items()), *extra]


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    root = tmp_path_factory.mktemp("combinations")
    (root / "data").mkdir()
    runs = {}
    for family in FAMILIES:
        args = [*COMMON, *family_args(family, root / "data")]
        if family in PARENT:
            parent, job = PARENT[family]
            args.append(f"init_from={runs[parent]['sweep'] / str(job)}")
        sweep = root / f"{family}-sweep"
        for job, strategy in enumerate(("full", "lora")):  # -m strategy=full,lora
            run_here([f"strategy={strategy}", *args], sweep / str(job), sweep=sweep)
        single = root / f"{family}-single"
        single.mkdir()
        kill_after_first_checkpoint(["strategy=lora", *args, "hydra.run.dir=run"], single)
        killed = read_record(single / "run")
        run_here(["strategy=lora", *args, "resume=true"], single / "run")
        runs[family] = {"sweep": sweep, "single": single / "run", "killed_status": killed["status"]}
    return root, runs


def _cells(family: str, runs: dict, out: Path) -> dict[str, str | None]:
    """Each cell's failure (None where it holds)."""
    sweep = runs[family]["sweep"]
    full, lora = read_record(sweep / "0"), read_record(sweep / "1")
    single = read_record(runs[family]["single"])
    failures = {}

    def cell(name, check):
        try:
            check()
            failures[name] = None
        except AssertionError as e:
            failures[name] = str(e).splitlines()[0] if str(e) else "assertion failed"

    def cached():
        kept = lora["cache"]["baseline"]  # each evaluator's entry
        assert kept and all(c == {"hits": 1, "misses": 0} for c in kept.values()), lora["cache"]
        assert lora["eval"]["baseline"] == full["eval"]["baseline"], "the reused baseline differs"

    def resumed():
        assert runs[family]["killed_status"] == "running", runs[family]["killed_status"]
        assert single["status"] == "completed" and single["train"]["resumed_from_step"] == 2, single["train"]
        assert single["cache"] == {}, single["cache"]  # a single run: no cache, its own baseline
        assert single["eval"]["baseline"] == lora["eval"]["baseline"], "the sweep's cached baseline is not the run's"
        assert single["samples"] == lora["samples"], "the samples before or after differ"
        assert single["train"]["loss_curve"] == lora["train"]["loss_curve"], "the losses differ"
        key = METRIC[family]
        assert single["eval"]["final"]["validation"][key] == pytest.approx(lora["eval"]["final"]["validation"][key])

    def chained():
        if family not in PARENT:
            assert "init_from" not in lora
            return
        parent_family, job = PARENT[family]
        parent = read_record(runs[parent_family]["sweep"] / str(job))
        after = parent["eval"]["final"]["ref_python_docs"]["loss"]
        for record in (full, lora, single):
            before = record["eval"]["baseline"]["ref_python_docs"]["loss"]
            assert before == pytest.approx(after, rel=1e-5), f"probe before {before}, the parent's after {after}"
        depth, link = 0, lora["init_from"]
        while link:
            depth, link = depth + 1, link.get("init_from")
        assert depth == FAMILIES.index(family), f"the record links {depth} runs of the chain"

    def strategies():
        assert full["status"] == lora["status"] == "completed"
        assert 0 < lora["params"]["trainable"] < full["params"]["trainable"] == full["params"]["total"]

    def exported():
        for job in ("0", "1"):
            folder = out / f"{family}-{job}"
            assert export_main([str(sweep / job), "--merge", "--check", "--out", str(folder)]) == 0, f"job {job}"
            assert json.loads((folder / "export.json").read_text())["merged"] is (job == "1")

    for name, check in zip(CELLS, (cached, resumed, chained, strategies, exported), strict=True):
        cell(name, check)
    return failures


def test_every_family_holds_in_every_combination(matrix, tmp_path, capsys):
    root, runs = matrix
    results = {family: _cells(family, runs, tmp_path) for family in FAMILIES}
    lines = ["| family | " + " | ".join(CELLS) + " |", "|---" * (len(CELLS) + 1) + "|"]
    for family, cells in results.items():
        lines.append(
            f"| {family} | " + " | ".join("ok" if cells[c] is None else f"FAIL: {cells[c]}" for c in CELLS) + " |"
        )
    with capsys.disabled():
        print("\n" + "\n".join(lines))
    failed = [f"{family} / {cell}: {why}" for family, cells in results.items() for cell, why in cells.items() if why]
    assert not failed, "\n".join(failed)

"""One job on two processes (torchrun, gloo on the CPU): the same training as one process, one writer, exact resume.

Each torchrun costs two process starts, so the suite launches three: a LoRA run (DDP) compared
with the same run in one process, and a full fine-tuning run stopped by SIGTERM and resumed.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from transfer.config.compose import check_command_line, compose_config
from transfer.errors import TransferError

# torchrun: two processes a run (`make test` and CI run them; -m "not slow" leaves them out)
pytestmark = pytest.mark.slow

# 32 validation sequences in 7 batches: the processes split evaluation unevenly, FSDP2's forward passes kept in step
TINY = [
    "block_size=64", "micro_batch_size=4", "grad_accum_steps=2", "eval_batch_size=5", "eval.max_tokens=2048",
    "eval/probes=[]", "eval.max_new_tokens=4", "log_interval=1", "hardware.estimate_memory=false", "eval.cka=true",
]  # fmt: skip
# a memory limit the estimate exceeds far: warned of, not refused (hardware.memory_check=warn)
LORA = [*(o for o in TINY if not o.startswith("hardware.estimate_memory")), "max_steps=6", "eval_interval=3",
        "strategy=lora", "strategy.dropout=0",  # dropout draws differ by rank
        "hardware.memory_limit=0.0001", "hardware.memory_check=warn"]  # fmt: skip
# validation improves by more than min_delta at steps 5, 15 and 25 (not 30): best/ is saved before the stop, read
# back by the resume, and put back from each process's shards for the final evaluation
FULL = [*TINY, "max_steps=30", "eval_interval=5", "checkpoint.interval=5", "early_stopping.min_delta=0.05"]


def torchrun(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "transfer", *args]  # fmt: skip
    return subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finished(proc: subprocess.Popen, timeout: int = 300) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return out


def one_process(args: list[str], cwd: Path) -> dict:
    """The same run in this process: a process start saved."""
    from transfer.run import run_experiment

    return run_experiment(compose_config(args), cwd / "one", choices={})


def curve(record: dict) -> list[float]:
    return [point["loss"] for point in record["train"]["loss_curve"]]


def assert_same_diagnostics(record: dict, single: dict) -> None:
    """Weight change per block and CKA per block: from each process's shards (FSDP2) or the whole model (DDP)."""
    for key in ("weight_change", "cka"):
        assert record["diagnostics"][key]["blocks"] == pytest.approx(single["diagnostics"][key]["blocks"], rel=1e-5)


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory) -> tuple[Path, str, dict]:
    """LoRA on two processes, and the same run in one (started together: the two cores share the work)."""
    root = tmp_path_factory.mktemp("ddp_lora")
    two = torchrun([*LORA, "hydra.run.dir=two"], root)
    single = one_process(LORA, root)
    return root / "two", finished(two), single


def test_two_processes_train_as_one(lora_runs):
    folder, _, single = lora_runs
    record = json.loads((folder / "metrics.json").read_text())
    assert record["status"] == "completed" and record["hardware"]["processes"] == 2
    assert curve(record) == pytest.approx(curve(single), rel=1e-6)
    for split in ("validation", "test"):
        assert record["eval"]["final"][split]["loss"] == pytest.approx(single["eval"]["final"][split]["loss"], rel=1e-6)
    assert record["train"]["tokens"] == single["train"]["tokens"]  # both processes' tokens, counted once
    # the memory estimate is rank 0's of one whole model, said so, and not judged against the limit as one process's is
    estimate = record["memory_estimate"]
    assert estimate["notes"][-1].startswith("one process holding the whole model, not each of torchrun's 2:")
    assert estimate["peak_bytes"] == single["memory_estimate"]["peak_bytes"]
    assert estimate["advice"] is None and single["memory_estimate"]["advice"].startswith("the run's estimated peak")
    assert_same_diagnostics(record, single)


def test_only_rank_zero_writes(lora_runs):
    folder, out, _ = lora_runs
    assert len(list(folder.glob("events.out.tfevents.*"))) == 1
    assert out.count("baseline validation:") == 1 and out.count("step 6/6") == 1  # one process logs
    log_lines = (folder / "transfer.log").read_text()
    assert log_lines.count("baseline validation:") == 1
    config = (folder / ".hydra" / "overrides.yaml").read_text()
    assert "hydra/job_logging" not in config  # rank 0's, not the silenced ranks'


def test_fsdp_stops_every_process_at_one_step_on_sigterm_and_resumes_exactly_on_two_or_one(tmp_path):
    proc = torchrun([*FULL, "hydra.run.dir=two"], tmp_path)
    deadline = time.time() + 240
    while time.time() < deadline and not (tmp_path / "two" / "checkpoints" / "step-000005").is_dir():
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)  # torchrun passes it on to both processes
    proc.communicate(timeout=120)
    record = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert record["status"] == "interrupted" and record["hardware"]["distributed"] == "fsdp"
    stopped = max(int(folder.name.split("-")[1]) for folder in (tmp_path / "two" / "checkpoints").glob("step-*"))
    # each process wrote its own shards (torch.distributed.checkpoint): weights and optimizer, nothing gathered
    from transfer.training.checkpoint import load_trainer_state

    last = tmp_path / "two" / "checkpoints" / f"step-{stopped:06d}"
    for folder in (last, tmp_path / "two" / "checkpoints" / "best"):
        assert sorted(p.name for p in (folder / "sharded").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
        assert not list(folder.glob("*.safetensors"))
    assert "optimizer" not in load_trainer_state(last) and "progress" in load_trainer_state(last)
    shutil.copytree(tmp_path / "two", tmp_path / "solo")
    finished(torchrun([*FULL, "hydra.run.dir=two", "resume=true"], tmp_path))
    resumed = json.loads((tmp_path / "two" / "metrics.json").read_text())
    # the checkpoint holds whole tensors: one process continues what two began
    from transfer.run import run_experiment

    solo = run_experiment(compose_config([*FULL, "resume=true"]), tmp_path / "solo", choices={})
    single = one_process(FULL, tmp_path)
    for run in (resumed, solo):
        assert run["status"] == "completed" and run["train"]["resumed_from_step"] == stopped >= 5
        assert curve(run) == pytest.approx(curve(single), rel=1e-6)
        assert run["eval"]["final"]["test"]["loss"] == pytest.approx(single["eval"]["final"]["test"]["loss"], rel=1e-6)
        assert run["train"]["final_weights"] == single["train"]["final_weights"] == {"which": "best", "step": 25}
        assert_same_diagnostics(run, single)
    # one process reads the shards two wrote: the exported model scores what the run recorded
    from transfer.export import check_export, export

    export(tmp_path / "two", out=tmp_path / "export")
    assert check_export(tmp_path / "export")["agree"]


def test_accumulation_that_does_not_divide_among_processes_is_one_line(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(TransferError) as e:
        check_command_line(["micro_batch_size=8", "grad_accum_steps=3", "hydra.run.dir=unused"])
    assert str(e.value) == (
        "grad_accum_steps=3 does not divide among 2 processes, which share each step's micro-batches; "
        "allowed: a multiple of 2, e.g. micro_batch_size=4 grad_accum_steps=6 for the same batch"
    )


# ---------------------------------------------------------------- evaluation split among the processes
def evaluations(tasks: dict) -> dict:
    """Validation by each objective's evaluator: sft with choices (perplexity and choice scores), DPO and KTO.

    Odd numbers of batches (sft's 40 examples in 7, DPO's 24 pairs in 5) leave the second process a batch fewer
    than the first, which it makes up uncounted."""
    import torch

    from transfer.models.load import load_model_and_tokenizer
    from transfer.objectives import build_objective
    from transfer.strategies import apply_strategy
    from transfer.training.hardware import resolve

    results = {}
    for name, args in tasks.items():
        cfg = compose_config(args)
        hardware = resolve(cfg.hardware)
        model, tokenizer = load_model_and_tokenizer(cfg.model, cfg.block_size)
        torch.manual_seed(0)  # LoRA's initial A, as a run's seed_everything sets it
        model, _ = apply_strategy(model, cfg.strategy, seed=0)
        objective = build_objective(cfg, tokenizer)
        splits = objective.prepare(None)
        if name != "sft":
            with torch.no_grad():
                for key, p in model.named_parameters():
                    if "lora_B" in key:
                        p.normal_(std=0.5)  # B starts at zero: make the policy differ from its reference
            objective.attach(model, splits, cfg, hardware)
        results[name] = objective.evaluate(model, splits["validation"], 6 if name == "sft" else 5, hardware, "v")
    return results


def _evaluate_as_rank(rank: int, folder: Path, tasks: dict, port: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))  # fmt: skip
    from transfer.training import distributed

    distributed.init()
    try:
        (folder / f"rank{rank}.json").write_text(json.dumps(evaluations(tasks)))
    finally:
        distributed.shutdown()


def test_evaluation_split_between_two_processes_equals_one(tmp_path):
    import socket

    import torch.multiprocessing as mp
    from test_objectives import parity_task
    from test_preference import preference_task

    (tmp_path / "sft").mkdir(), (tmp_path / "pairs").mkdir()
    sft, pairs = parity_task(tmp_path / "sft"), [*preference_task(tmp_path / "pairs"), "strategy=lora"]
    tasks = {"sft": sft, "dpo": [*pairs, "objective=dpo"], "kto": [*pairs, "objective=kto"]}
    single = evaluations(tasks)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_evaluate_as_rank, args=(tmp_path, tasks, port), nprocs=2)
    assert single["sft"]["choice_examples"] == 40 and single["dpo"]["examples"] == 24
    assert 0 < single["dpo"]["reward_accuracy"] < 1 and single["dpo"]["token_kl"] > 0  # the rewards differ by pair
    for rank in (0, 1):
        split = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert split.keys() == single.keys()
        for name, result in single.items():
            assert split[name].keys() == result.keys()
            for key, value in result.items():
                assert (name, key, split[name][key]) == (
                    name,
                    key,
                    pytest.approx(value, rel=1e-9) if isinstance(value, float) else value,
                )

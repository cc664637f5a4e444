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

from transfer.errors import TransferError
from transfer.validate import check_command_line, compose_config

# torchrun: two processes a run (`make test` and CI run them; -m "not slow" leaves them out)
pytestmark = pytest.mark.slow

TINY = [
    "block_size=64", "micro_batch_size=4", "grad_accum_steps=2", "eval_batch_size=32", "eval.max_tokens=2048",
    "eval/probes=[]", "eval.max_new_tokens=4", "log_interval=1", "hardware.estimate_memory=false",
]  # fmt: skip
LORA = [*TINY, "max_steps=6", "eval_interval=3", "strategy=lora", "strategy.dropout=0"]  # dropout draws differ by rank
FULL = [*TINY, "max_steps=30", "eval_interval=10", "checkpoint.interval=5"]


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


def test_accumulation_that_does_not_divide_among_processes_is_one_line(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(TransferError) as e:
        check_command_line(["micro_batch_size=8", "grad_accum_steps=3", "hydra.run.dir=unused"])
    assert str(e.value) == (
        "grad_accum_steps=3 does not divide among 2 processes, which share each step's micro-batches; "
        "allowed: a multiple of 2, e.g. micro_batch_size=4 grad_accum_steps=6 for the same batch"
    )

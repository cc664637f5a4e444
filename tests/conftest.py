import fcntl
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

# Triton's kernels (Liger's, hardware.kernels=liger) run on a CPU only in Triton's interpreter, which Triton chooses
# when a kernel is defined: before any test imports one. A GPU runs them compiled.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Small, fast settings for real runs of the default experiment on a CPU.
FAST = [
    "max_steps=30", "eval_interval=10", "block_size=64", "micro_batch_size=8", "eval_batch_size=32",
    "eval.max_tokens=4096", "eval.probes.python_docs.max_tokens=4096", "eval.max_new_tokens=8",
    "hardware.estimate_memory=false",  # a few seconds a run; the tests of the estimate turn it on
]  # fmt: skip
# The shortest real run with a checkpoint: what the resume and overwrite tests start from.
SHORT = [*(a for a in FAST if not a.startswith("eval.probes.")), "max_steps=10", "eval_interval=0", "eval/probes=[]"]
# A sweep of two jobs that differ only in the learning rate, with a checkpoint halfway.
SWEEP = ["-m", *FAST, "max_steps=20", "checkpoint.interval=10", "optimizer.lr=1e-4,1e-3"]


def skip_or_fail(reason: str) -> None:
    """Skip on a machine that lacks what the test needs; fail under CI=true (.ci/run exports it), where all of it is
    there, ../shared included: a green CI never hides tests that did not run."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason}, and under CI=true that is a failure, not a skip")
    pytest.skip(reason)


def shared_folder() -> Path:
    """../shared (real models and datasets), through TRANSFER_SHARED; skip without it (fail under CI=true)."""
    value = os.environ.get("TRANSFER_SHARED")
    if not value or not Path(value).is_dir():
        skip_or_fail(f"TRANSFER_SHARED={value or ''} is not the shared/ folder (real models and datasets)")
    return Path(value).resolve()  # tests run the CLI in other folders: a relative path would break there


# `make test` hands each worker of pytest-xdist whole modules (--dist loadfile): a module-scoped fixture (the config
# cases' driver, a sweep of test_aggregate, the runs of test_export) is then made once, where a split module made it
# in both workers. The longest modules go first, so that what is left at the end is short: with two workers, the
# suite ends when the later one does. Seconds are each module's total in a run of the whole suite (approximate).
LONGEST_FIRST = (
    "test_reliability.py",  # 150: the config cases' driver, faults that start and kill runs
    "test_launchers.py",  # 140: Ray and submitit sweeps
    "test_distributed.py",  # 95: torchrun
    "test_combinations.py",  # 70
    "test_strategies.py",  # 65
    "test_evaluation.py",  # 60
    "test_trackers.py",  # 55
    "test_search.py",  # 45
    "test_preference.py",  # 35
    "test_bench.py",  # 32 (its CPU time alone): most benchmark scripts run in the test's process
    "test_aggregate.py",  # 30
    "test_qwen.py",  # 30, where the Qwen model is built
    "test_speed.py",  # 30
    "test_memory.py",  # 25
    "test_cli.py",  # 20
)


def pytest_collection_modifyitems(items):
    first = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: first.get(item.path.name, len(first)))


@pytest.fixture(scope="session")
def shared() -> Path:
    return shared_folder()


@pytest.fixture(scope="session")
def qwen() -> Path:
    """The real Qwen2.5-Coder-0.5B-Instruct folder that model=qwen2_5_coder_0_5b reads (`make qwen` builds it); a
    skip without it, under CI=true too: CI does not build it (480 MB of downloads and minutes of a CPU)."""
    from transfer.config.compose import compose_config

    folder = Path(compose_config(["model=qwen2_5_coder_0_5b"]).model.name_or_path).expanduser()
    if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
        pytest.skip(f"no Qwen2.5-Coder-0.5B-Instruct in {folder} (make qwen, or TRANSFER_QWEN2_5_CODER=its folder)")
    return folder


def run_cli(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python -m transfer ARGS` in `cwd`, as a user would run it, with the hub off."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "transfer", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def run_ok(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """run_cli, and the run must succeed."""
    proc = run_cli(args, cwd, timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def run_here(args: list[str], out: Path, sweep: Path | None = None) -> dict:
    """The job of `python -m transfer ARGS`, run in this process into `out` with what the CLI's job() hands
    run_experiment (the chosen group options, the overrides; the sweep's folder for a sweep's job): its record.

    For a test of what a run computes and records; the command line's own behaviour (its output, exit status,
    folder lock, Hydra's files) needs run_cli. A process start saved: each costs seconds of imports."""
    from transfer.config.compose import compose_config
    from transfer.config.schema import GROUPS
    from transfer.run import run_experiment

    choices = compose_config(args, with_hydra=True).hydra.runtime.choices
    cfg = compose_config(args)
    chosen = {g: choices.get(g) for g in GROUPS} | {"probes": ",".join(cfg.eval.probes) or "none"}
    return run_experiment(cfg, out, chosen, list(args), sweep=sweep)


def loss_and_grads(model, ids, labels, chunk_tokens: int, scale: float = 1.0, autocast=None, liger: bool = False):
    """summed_lm_loss (Liger's fused loss with `liger`) and a backward pass scaled by `scale` (as the mean over tokens
    and accumulation scale it), under autocast to that dtype if given: (loss, scored tokens, each trainable
    parameter's gradient)."""
    import torch

    from transfer.training.loss import summed_lm_loss

    model.zero_grad()
    with torch.autocast(ids.device.type, dtype=autocast, enabled=autocast is not None):
        loss, count = summed_lm_loss(model, ids, labels, chunk_tokens=chunk_tokens, liger=liger)
    (loss * scale).backward()
    return loss.detach(), count, {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}


def kill_after_first_checkpoint(args: list[str], cwd: Path) -> None:
    """Start `python -m transfer ARGS` (into cwd/run) and kill it outright once its first step checkpoint exists."""
    proc = subprocess.Popen([sys.executable, "-m", "transfer", *args], cwd=cwd, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 120
    while time.time() < deadline and not list((cwd / "run" / "checkpoints").glob("step-*[0-9]")):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def assert_same_training(a: dict, b: dict, metrics=("loss",)) -> None:
    """Two records trained alike: the same loss at every logged step, the same final validation metrics (to 1e-6)."""
    for x, y in zip(a["train"]["loss_curve"], b["train"]["loss_curve"], strict=True):
        assert x["step"] == y["step"] and x["loss"] == pytest.approx(y["loss"], rel=1e-6)
    for key in metrics:
        assert a["eval"]["final"]["validation"][key] == pytest.approx(b["eval"]["final"]["validation"][key], rel=1e-6)


def copy_run(folder: Path, to: Path) -> Path:
    """A private copy of a shared run folder, for a test that changes or resumes it."""
    shutil.copytree(folder, to, symlinks=True)
    return to


# Real runs shared by the tests that only read them: each costs a process start and a
# training, and the suite must stay short (issue: `make test` under ten minutes). They are made
# once for the whole session, whichever worker of pytest-xdist asks first: the others wait for it.
def made_once(tmp_path_factory, name: str, make) -> Path:
    """`make(folder)` run once per test session in a folder all workers share (under a lock); the folder."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the session's folder, above each worker's own
    folder = base / f"shared-{name}"
    with open(base / f"shared-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / ".made").is_file():
            shutil.rmtree(folder, ignore_errors=True)  # what a failed attempt left
            folder.mkdir()
            make(folder)
            (folder / ".made").touch()
    return folder


@pytest.fixture(scope="session")
def fast_run(tmp_path_factory) -> Path:
    """The default experiment in FAST settings, logging every step and checkpointing every 5."""
    args = [*FAST, "log_interval=1", "checkpoint.interval=5", "checkpoint.keep=2", "hydra.run.dir=run"]
    return made_once(tmp_path_factory, "fast_run", lambda root: run_ok(args, root)) / "run"


@pytest.fixture(scope="session")
def short_run(tmp_path_factory) -> Path:
    return made_once(tmp_path_factory, "short_run", lambda root: run_ok([*SHORT, "hydra.run.dir=run"], root)) / "run"


@pytest.fixture(scope="session")
def two_job_sweep(tmp_path_factory) -> Path:
    """The sweep folder, where Hydra puts it by default: multirun/<date>/<time>/."""
    root = made_once(tmp_path_factory, "two_job_sweep", lambda root: run_ok(SWEEP, root))
    (sweep,) = root.glob("multirun/*/*")
    return sweep


def cache_hub_model(cache: Path, name: str) -> None:
    """The local Hugging Face cache's layout for one model's config.json (huggingface_hub's models--org--name)."""
    folder = cache / f"models--{name.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("0" * 40)
    (folder / "snapshots" / ("0" * 40)).mkdir(parents=True)
    (folder / "snapshots" / ("0" * 40) / "config.json").write_text("{}")


def cache_every_hub_model(cache: Path) -> Path:
    """A Hugging Face cache that holds every hub model the model group's options name: what start-up checks find
    cached on a machine that ran them before (tests run offline)."""
    from transfer.config.compose import compose_config, group_options

    for option in group_options("model"):
        try:
            name = compose_config([f"model={option}"]).model.name_or_path
        except Exception:  # an option that needs a name of its own (model=local)
            continue
        if name:
            cache_hub_model(cache, name)
    return cache

import os
import subprocess
import sys
from pathlib import Path

import pytest

# Small, fast settings for real runs of the default experiment on a CPU.
FAST = [
    "max_steps=30", "eval_interval=10", "block_size=64", "micro_batch_size=8", "eval_batch_size=32",
    "eval.reference.max_tokens=8192", "eval.max_new_tokens=8",
]  # fmt: skip


@pytest.fixture(scope="session")
def shared() -> Path:
    """../shared (real models and datasets), through TRANSFER_SHARED; skip without it."""
    value = os.environ.get("TRANSFER_SHARED")
    if not value or not Path(value).is_dir():
        pytest.skip("TRANSFER_SHARED is not set to the shared/ folder")
    return Path(value)


def run_cli(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python -m transfer ARGS` in `cwd`, as a user would run it, with the hub off."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "transfer", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )

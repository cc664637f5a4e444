"""What a run tells the person watching it: where its output goes, times and numbers as people read them, progress
during a long evaluation, a busy machine, Ctrl-C during a sweep job's evaluation."""

import json
import logging
import os
import signal
import subprocess
import sys
import time

import pytest


def test_a_busy_machine_is_warned_of_once_before_training(monkeypatch, caplog):
    from transfer.training import hardware

    cpus = len(os.sched_getaffinity(0))
    monkeypatch.setattr(hardware, "_warned_busy", False)
    log = logging.getLogger("transfer.test")
    monkeypatch.setattr(os, "getloadavg", lambda: (cpus + 0.4, 0.0, 0.0))  # the run's own start-up: not busy
    hardware.warn_if_busy(log)
    assert caplog.messages == []
    monkeypatch.setattr(os, "getloadavg", lambda: (cpus + 2.0, 0.0, 0.0))
    hardware.warn_if_busy(log)
    hardware.warn_if_busy(log)  # a sweep's next job in the same process
    assert caplog.messages == [
        f"the machine is busy: a load average of {cpus + 2.0:.1f} over the last minute on the {cpus} "
        f"CPU{'' if cpus == 1 else 's'} this run may use; every speed figure of this run (tokens/s, seconds, time "
        "left) will be slower than on an idle machine"
    ]
    # the record's verdict after the fact is the same
    assert hardware.MachineLoad().summary()["contended"] is True


@pytest.mark.slow
def test_ctrl_c_during_a_submitit_jobs_evaluation_stops_it_at_once(tmp_path):
    """Ctrl-C to the launching process of a submitit_local sweep while its job scores the untrained model: the sweep
    stops its job with SIGTERM, which submitit's own handler ignored outside training, so the job ran on until the
    cancel that follows 30 s later (SIGINT through submitit's controller, with its traceback). Now it stops on the
    SIGTERM: its record says so, and no traceback is printed."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="the submitit plugin is not installed")
    args = ["-m", "max_steps=2", "eval.max_tokens=512", "eval_batch_size=1", "eval.max_new_tokens=2", "hardware=cpu",
            "hardware.num_threads=1", "hardware.estimate_memory=false", "hydra/launcher=submitit_local",
            "hydra.sweep.dir=sweep"]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "transfer", *args], cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    log = tmp_path / "sweep" / "0" / "transfer.log"
    try:
        deadline = time.time() + 240
        while not (log.is_file() and "baseline test: " in log.read_text()) and time.time() < deadline:
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)  # the whole python_docs probe remains: seconds of it, in batches of one
        out, err = proc.communicate(timeout=240)
    finally:
        proc.kill()
    assert proc.returncode == 130 and "Traceback" not in out + err, err[-3000:]
    assert err.strip().splitlines()[-1].startswith("interrupted (Ctrl-C); continue with: python -m transfer -m ")
    record = json.loads((tmp_path / "sweep" / "0" / "metrics.json").read_text())
    assert record["status"] == "interrupted" and record["error"] == "interrupted (SIGTERM); resume it with resume=true"
    assert "baseline" not in record["eval"]  # stopped within the baseline's evaluation

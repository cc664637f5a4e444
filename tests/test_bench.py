"""The benchmark scripts run, so they cannot rot (tiny shapes; no time is asserted)."""

import contextlib
import importlib.util
import io
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
from conftest import run_here

from transfer.training import hardware

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def _run(script: str, *args: str) -> str:
    proc = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    return proc.stdout


def _load(script: str):
    """A benchmark script as a module, for a test that calls into it."""
    spec = importlib.util.spec_from_file_location(script.removesuffix(".py"), BENCH / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _main(monkeypatch, capsys, script: str, *args: str) -> str:
    """The script's main() on these arguments in this process (a process start saved), and what it printed; it
    sees the benchmarks' folder first on sys.path, as when run as a script."""
    monkeypatch.syspath_prepend(str(BENCH))
    main = _load(script).main
    monkeypatch.setattr(sys, "argv", [script, *args])
    main()
    return capsys.readouterr().out


def test_trainer_benchmark_on_a_real_pretrained_model_agrees_and_profiles(shared, monkeypatch, capsys):
    """One run of the benchmark: the real pretrained model, both trainers, and one more run of each under torch's
    profiler. Each measurement's command line is the script's own, run by the script's main() in this process (a
    fresh process each was most of the suite's time here); glibc's setting is recorded, not made: it would outlive
    the test in this process (tests/test_memory.py makes it in a process of its own)."""
    bench = _load("trainer_vs_hf.py")

    def in_this_process(cmd, **kwargs):
        assert cmd[:2] == [sys.executable, bench.__file__], cmd
        out = io.StringIO()
        with monkeypatch.context() as m, contextlib.redirect_stdout(out):
            m.setattr(sys, "argv", cmd[1:])
            bench.main()
        return subprocess.CompletedProcess(cmd, 0, out.getvalue(), "")

    monkeypatch.setattr(bench, "subprocess", types.SimpleNamespace(run=in_this_process))
    returned = []
    monkeypatch.setattr(hardware, "return_freed_memory", lambda: returned.append(1) or True)
    model = shared / "models" / "stories260k"  # Llama, 260,032 parameters, tied embeddings
    monkeypatch.setattr(sys, "argv", ["trainer_vs_hf.py", "--shape", "tiny", "--repeats", "1", "--rows", "lora",
                                      "--model", str(model), "--profile", "1000", "--hf-return-freed",
                                      "hardware.return_freed_memory=true"])  # fmt: skip
    bench.main()
    out = capsys.readouterr().out
    assert f"model {model} (pretrained)" in out and "'layers': 5, 'vocab': 512" in out
    # the allocator setting reaches both sides when asked (by default: ours from 100M parameters on a CPU), in each
    # of the 4 runs (2 measured, 2 profiled)
    assert "ours: loss_chunk_tokens=4096, freed memory returned on" in out and "HF: freed memory returned on" in out
    assert len(returned) == 4
    (row,) = [line.split("|") for line in out.splitlines() if line.startswith("| lora")]
    assert row[2].strip() == "92,480"  # LoRA r=16 on the 7 projections of 5 blocks of width 64
    ours, hf = float(row[9]), float(row[10])  # LoRA's A starts alike in both runs: the same losses
    assert abs(ours - hf) <= 1e-4  # as printed, to 4 decimals (they differed by 0.05 when A did not)
    assert "final losses agree" in out
    for impl in ("ours", "hf"):  # the profiled runs' tables (every operation): the timed steps, 3 of the shape's 4
        table = out.split(f"## lora, {impl}: the timed steps under torch's profiler")[1].split("```")[1]
        calls = {line[:60].strip(): line.split()[-1] for line in table.splitlines()[3:] if line.strip()}
        assert calls["ProfilerStep*"] == calls["Optimizer.step#AdamW.step"] == "3", table


def test_head_loss_benchmark_runs_and_the_ways_agree(monkeypatch, capsys):
    # Liger's kernels on a CPU in Triton's interpreter (conftest sets it where there is no GPU)
    liger = importlib.util.find_spec("liger_kernel") is not None and os.environ.get("TRITON_INTERPRET") == "1"
    out = _main(monkeypatch, capsys, "head_loss.py", "--tokens", "64", "--vocab", "1000", "--repeats", "1",
                *(["--liger"] if liger else []))  # fmt: skip
    rows = [line.split("|")[1].strip() for line in out.splitlines() if line.startswith("| ") and "way" not in line]
    assert rows == ["autograd", "ours", *(["liger"] if liger else [])]
    # fp32 on the CPU: the same sums in another order, so tight (the script exits non-zero otherwise)
    assert "losses and gradients agree with ours (within 1e-06 and 1e-05, relative)" in out


def test_head_loss_benchmark_refuses_gradients_that_differ_by_more_than_fp32_rounding(monkeypatch, capsys):
    """A way whose loss is ours but whose gradients are 1e-4 off (the forward pass unchanged, the backward scaled):
    fp32's sums in another order stay within 1e-5, so the benchmark says it disagrees (3e-2 let it pass)."""
    head_loss = _load("head_loss.py")
    autograd = head_loss.WAYS["autograd"]
    monkeypatch.setitem(head_loss.WAYS, "autograd", lambda hidden, weight, targets, chunk: autograd(
        hidden + 1e-4 * (hidden - hidden.detach()), weight, targets, chunk))  # fmt: skip
    monkeypatch.setattr(sys, "argv", ["head_loss.py", "--tokens", "64", "--vocab", "1000", "--repeats", "1"])
    with pytest.raises(SystemExit) as e:
        head_loss.main()
    assert str(e.value).startswith("losses or gradients disagree with ours: autograd (gradients 1.00e-04 apart, ")
    assert str(e.value).endswith("allowed in fp32: 1e-05)")


def test_eval_throughput_benchmark_runs_and_losses_agree(monkeypatch, capsys):
    # the script exits non-zero when our loss and the plain loop's disagree
    out = _main(monkeypatch, capsys, "eval_throughput.py", "--shape", "tiny", "--blocks", "4", "--repeats", "1")
    assert "| ours tok/s |" in out


def test_startup_benchmark_reads_the_timing_of_a_real_run():
    out = _run("startup.py", "--repeats", "1", "eval.max_tokens=1024", "eval.probes.python_docs.max_tokens=1024")
    row = out.strip().splitlines()[-1]
    assert row.count(" s |") == 7, out


def test_memory_estimate_benchmark_compares_a_real_runs_record(monkeypatch, capsys):
    """The row's run is the command line's job, run in this process (conftest.run_here; a process start saved): the
    figures measured are then this process's, which the test does not read."""
    bench = _load("memory_estimate.py")

    def in_this_process(cmd, **kwargs):
        assert cmd[:3] == [sys.executable, "-m", "transfer"], cmd
        (out,) = [a.removeprefix("hydra.run.dir=") for a in cmd if a.startswith("hydra.run.dir=")]
        run_here([a for a in cmd[3:] if not a.startswith("hydra.run.dir=")], Path(out))
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(bench, "subprocess", types.SimpleNamespace(run=in_this_process))
    monkeypatch.setattr(sys, "argv", ["memory_estimate.py", "--device", "cpu", "--shape", "tiny", "--rows", "lora"])
    bench.main()
    out = capsys.readouterr().out
    (row,) = [line for line in out.splitlines() if line.startswith("| lora |")]
    assert row.count("|") == 9 and "measured: cpu_peak_rss" in out

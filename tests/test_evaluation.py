"""Evaluation, early stopping, best weights, checkpoints and resume, in real runs."""

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import FAST, run_cli

from transfer.data import load_splits
from transfer.evaluate import evaluate
from transfer.hardware import resolve
from transfer.models import load_model_and_tokenizer
from transfer.validate import compose_config

CORPUS = Path(__file__).resolve().parent.parent / "transfer" / "corpora" / "rust_concepts"


def record_of(folder: Path) -> dict:
    return json.loads((folder / "metrics.json").read_text())


def overfit_args(tmp_path: Path) -> list[str]:
    """Twelve passages to train on, unseen Rust topics to validate on, a high learning rate."""
    small = tmp_path / "small.jsonl"
    small.write_text("".join((CORPUS / "train.jsonl").read_text().splitlines(keepends=True)[:12]))
    return [
        "dataset=text_files", f"dataset.train_files=[{small}]",
        f"dataset.validation_files=[{CORPUS / 'validation.jsonl'}]", f"dataset.test_files=[{CORPUS / 'test.jsonl'}]",
        "max_steps=400", "eval_interval=10", "optimizer.lr=3e-3", "optimizer.warmup_ratio=0",
        "block_size=64", "eval/reference=none", "checkpoint.enabled=false",
    ]  # fmt: skip


def test_early_stopping_restores_the_best_weights(tmp_path):
    proc = run_cli([*overfit_args(tmp_path), "early_stopping.patience=3", "hydra.run.dir=run"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = record_of(tmp_path / "run")
    train = r["train"]
    assert train["stop_reason"] == "early_stop"
    assert train["steps"] < train["planned_steps"] == 400
    curve = {v["step"]: v["loss"] for v in train["validation_curve"]}
    best_step = min(curve, key=curve.get)
    assert train["best_step"] == best_step
    # three validations after the best, none better: that is what stopped it
    assert train["steps"] == best_step + 3 * 10
    assert train["final_weights"] == {"which": "best", "step": best_step}
    # the final evaluation ran on the restored best weights, not the last ones
    assert r["eval"]["final"]["validation"]["loss"] == pytest.approx(curve[best_step], rel=1e-6)
    assert r["eval"]["final"]["validation"]["loss"] < curve[train["steps"]]


def test_last_weights_when_asked(tmp_path):
    args = [*overfit_args(tmp_path), "max_steps=60", "eval.weights=last", "hydra.run.dir=run"]
    assert run_cli(args, cwd=tmp_path).returncode == 0
    r = record_of(tmp_path / "run")
    assert r["train"]["final_weights"] == {"which": "last", "step": 60}
    assert r["train"]["stop_reason"] == "max_steps"
    last = r["train"]["validation_curve"][-1]
    assert last["step"] == 60 and r["eval"]["final"]["validation"]["loss"] == pytest.approx(last["loss"], rel=1e-6)


def test_record_has_reference_samples_memory_and_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    proc = run_cli([*FAST, "eval.max_new_tokens=8", "hydra.run.dir=run"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = record_of(tmp_path / "run")
    for when in ("baseline", "final"):
        ref = r["eval"][when]["reference"]
        assert (
            math.isfinite(ref["perplexity"]) and ref["tokens"] == 8192 - 8192 // 64
        )  # first token of each block unscored
    assert r["eval"]["change_pct"]["reference"] == pytest.approx(
        100 * (r["eval"]["final"]["reference"]["perplexity"] / r["eval"]["baseline"]["reference"]["perplexity"] - 1)
    )
    assert [s["prompt"] for s in r["samples"]] == [
        "In Rust, Vec<T> is",
        "The Result type in Rust",
        "Ownership in Rust means",
    ]
    assert all(len(s["completion"].encode()) <= 8 and len(s["completion_after"].encode()) <= 8 for s in r["samples"])
    assert json.loads((tmp_path / "run" / "samples.json").read_text()) == r["samples"]
    assert r["memory"]["bytes"] > 50e6 and r["memory"]["kind"] in ("cpu_peak_rss", "cpu_peak_rss_process")
    assert (
        r["train"]["checkpoint"]["bytes"]
        == (tmp_path / "run/checkpoints/step-000030/trainable.safetensors").stat().st_size
    )

    events = EventAccumulator(str(tmp_path / "run"), size_guidance={"tensors": 0})
    events.Reload()
    assert {"reference/perplexity", "final/validation_perplexity"} <= set(events.Tags()["scalars"])
    assert {"samples/0/text_summary", "samples/2/text_summary"} <= set(events.Tags()["tensors"])
    plugins = events.PluginTagToContent("hparams")
    assert "_hparams_/experiment" in plugins and "_hparams_/session_start_info" in plugins


def test_checkpoints_rotate_and_keep_the_best(tmp_path):
    args = [*FAST, "max_steps=30", "checkpoint.interval=5", "checkpoint.keep=2", "hydra.run.dir=run"]
    assert run_cli(args, cwd=tmp_path).returncode == 0
    folders = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert folders == ["best", "step-000025", "step-000030"]
    best = json.loads((tmp_path / "run/checkpoints/best/best.json").read_text())
    assert best["step"] == record_of(tmp_path / "run")["train"]["best_step"]


def _kill_after_first_checkpoint(args: list[str], cwd: Path) -> None:
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "transfer", *args], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 120
    while time.time() < deadline and not list((cwd / "run" / "checkpoints").glob("step-*[0-9]")):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_kill_and_resume_gives_the_same_losses(tmp_path):
    # dropout on, so that the RNG state matters too
    args = [*FAST, "max_steps=40", "eval_interval=20", "checkpoint.interval=10", "log_interval=1",
            "strategy=lora", "strategy.dropout=0.1", "eval/reference=none"]  # fmt: skip
    assert run_cli([*args, "hydra.run.dir=straight"], cwd=tmp_path).returncode == 0
    _kill_after_first_checkpoint([*args, "hydra.run.dir=run"], tmp_path)
    killed = record_of(tmp_path / "run")
    assert killed["status"] == "running", "the run finished before it could be killed"
    proc = run_cli([*args, "resume=true", "hydra.run.dir=run"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed, straight = record_of(tmp_path / "run"), record_of(tmp_path / "straight")
    assert resumed["train"]["resumed_from_step"] in range(10, 40, 10)
    # CPU float32 with the same ops in the same order is deterministic: the restored
    # weights, optimizer moments, schedule, RNG and data position give the very same
    # numbers; 1e-6 only leaves room for the last bit of a float32 sum.
    for a, b in zip(resumed["train"]["loss_curve"], straight["train"]["loss_curve"], strict=True):
        assert a["step"] == b["step"] and a["loss"] == pytest.approx(b["loss"], rel=1e-6)
    assert resumed["eval"]["final"]["validation"]["loss"] == pytest.approx(
        straight["eval"]["final"]["validation"]["loss"], rel=1e-6
    )
    assert resumed["train"]["tokens"] == straight["train"]["tokens"]


def test_resume_under_another_config_is_refused(tmp_path):
    args = [*FAST, "max_steps=10", "eval/reference=none"]
    assert run_cli([*args, "hydra.run.dir=run"], cwd=tmp_path).returncode == 0
    record = record_of(tmp_path / "run")
    record["status"] = "running"
    (tmp_path / "run" / "metrics.json").write_text(json.dumps(record))
    proc = run_cli([*args, "optimizer.lr=1e-3", "resume=true", "hydra.run.dir=run"], cwd=tmp_path)
    assert proc.returncode == 1
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if "error:" in line]
    assert len(errors) == 1
    assert "was made with optimizer.lr=0.0003, this run has optimizer.lr=0.001 (1 difference(s))" in errors[0]


def test_peft_checkpoint_loads_with_peft_and_scores_the_same(tmp_path):
    from peft import PeftModel

    overrides = [*FAST, "strategy=lora", "strategy.r=4", "eval.weights=last", "eval/reference=none"]
    assert run_cli([*overrides, "hydra.run.dir=run"], cwd=tmp_path).returncode == 0
    r = record_of(tmp_path / "run")
    folder = tmp_path / "run" / "checkpoints" / "step-000030"
    assert (folder / "adapter_config.json").is_file()
    assert r["train"]["checkpoint"]["bytes"] == (folder / "adapter_model.safetensors").stat().st_size
    cfg = compose_config(overrides)
    base, tokenizer = load_model_and_tokenizer(cfg.model, cfg.block_size)
    model = PeftModel.from_pretrained(base, folder)
    splits = load_splits(cfg.dataset, tokenizer, cfg.block_size)
    result = evaluate(model, splits["validation"], cfg.eval_batch_size, resolve(cfg.hardware))
    assert result["loss"] == pytest.approx(r["eval"]["final"]["validation"]["loss"], rel=1e-6)


def test_resumed_sweep_skips_completed_jobs_and_finishes_the_others(tmp_path):
    args = ["-m", *FAST, "max_steps=10", "eval/reference=none", "optimizer.lr=1e-4,1e-3", "hydra.sweep.dir=sweep"]
    assert run_cli(args, cwd=tmp_path).returncode == 0
    done, interrupted = tmp_path / "sweep" / "0", tmp_path / "sweep" / "1"
    done_bytes = (done / "metrics.json").read_bytes()
    record = record_of(interrupted)
    record["status"] = "running"  # as a killed job leaves it
    (interrupted / "metrics.json").write_text(json.dumps(record))
    proc = run_cli([*args, "resume=true"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (done / "metrics.json").read_bytes() == done_bytes  # skipped, untouched
    again = record_of(interrupted)
    assert again["status"] == "completed" and again["train"]["resumed_from_step"] == 10
    assert again["eval"]["final"] == record["eval"]["final"]


@pytest.mark.parametrize(
    "case,message",
    [
        ("missing", "resume='/nonexistent/run': no such folder"),
        ("corrupt", "is unreadable"),
        ("empty_reference", "eval.reference='text_files' is empty"),
    ],
)
def test_bad_resume_and_reference_are_one_line_and_lose_nothing(tmp_path, case, message):
    args = [*FAST, "max_steps=10", "eval/reference=none"]
    if case == "corrupt":
        assert run_cli([*args, "hydra.run.dir=old"], cwd=tmp_path).returncode == 0
        state = tmp_path / "old" / "checkpoints" / "step-000010" / "trainer_state.pt"
        state.write_bytes(b"not a checkpoint")
        args += [f"resume={tmp_path / 'old'}"]
    elif case == "missing":
        args += ["resume=/nonexistent/run"]
    else:
        empty = tmp_path / "empty.jsonl"
        empty.write_text(json.dumps({"text": ""}) + "\n")
        args += ["eval/reference=text_files", f"eval.reference.files=[{empty}]"]
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    proc = run_cli([*args, "hydra.run.dir=run"], cwd=tmp_path)
    assert proc.returncode == (2 if case == "missing" else 1)  # 2: refused before Hydra started
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0], proc.stdout[-2000:] + proc.stderr[-2000:]
    assert all(p.read_bytes() == data for p, data in before.items())


def test_max_new_tokens_below_one_is_refused(tmp_path):
    proc = run_cli(["eval.max_new_tokens=0"], cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: eval.max_new_tokens=0 must be at least 1"


def test_real_model_learns_rust_and_forgetting_is_measured(shared, tmp_path):
    book = shared / "datasets" / "rust_book" / "prose_paragraphs"
    args = [
        f"model.name_or_path={shared / 'models' / 'stories260k'}", "model.tokenizer_from_json=true",
        "dataset=text_files", f"dataset.train_files=[{book / 'train.jsonl'}]",
        f"dataset.validation_files=[{book / 'validation.jsonl'}]", f"dataset.test_files=[{book / 'test.jsonl'}]",
        "eval/reference=text_files", f"eval.reference.files=[{shared / 'datasets' / 'wikitext2_raw' / 'test.jsonl'}]",
        "eval.reference.max_tokens=20000", "max_steps=40", "eval_interval=20", "block_size=128",
        "optimizer.lr=1e-3", "hydra.run.dir=run",
    ]  # fmt: skip
    proc = run_cli(args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = record_of(tmp_path / "run")
    base, final = r["eval"]["baseline"], r["eval"]["final"]
    assert final["validation"]["perplexity"] < 0.8 * base["validation"]["perplexity"]
    assert final["test"]["perplexity"] < base["test"]["perplexity"]
    assert (
        base["reference"]["tokens"] == final["reference"]["tokens"] == 20000 - 157
    )  # 157 blocks: first tokens unscored
    assert math.isfinite(final["reference"]["perplexity"])


def test_evaluation_is_deterministic_under_no_grad():
    cfg = compose_config(["block_size=64"])
    model, tokenizer = load_model_and_tokenizer(cfg.model, 64)
    splits = load_splits(cfg.dataset, tokenizer, 64)
    model.train()
    a = evaluate(model, splits["test"], 8, resolve(cfg.hardware))
    b = evaluate(model, splits["test"], 32, resolve(cfg.hardware))
    assert model.training, "evaluation must hand the model back in the mode it found it"
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
    assert all(p.grad is None for p in model.parameters())
    assert torch.is_grad_enabled()

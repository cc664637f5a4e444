"""Evaluation, early stopping, best weights, checkpoints and resume, in real runs."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import FAST, SHORT, SWEEP, copy_run, run_cli, run_here

from transfer.config.compose import compose_config
from transfer.errors import TransferError
from transfer.models.load import load_model_and_tokenizer
from transfer.objectives import build_objective
from transfer.training.hardware import resolve

CORPUS = Path(__file__).resolve().parent.parent / "transfer" / "corpora" / "rust_concepts"


def record_of(folder: Path) -> dict:
    return json.loads((folder / "metrics.json").read_text())


def overfit_args(tmp_path: Path) -> list[str]:
    """Four passages to train on, twelve of unseen Rust topics to validate on, a high learning rate:
    the validation loss bottoms out within a few validations."""
    splits = {}
    for split, n in (("train", 4), ("validation", 12), ("test", 12)):
        splits[split] = tmp_path / f"{split}.jsonl"
        splits[split].write_text("".join((CORPUS / f"{split}.jsonl").read_text().splitlines(keepends=True)[:n]))
    return [
        "dataset=text_files", f"dataset.train_files=[{splits['train']}]",
        f"dataset.validation_files=[{splits['validation']}]", f"dataset.test_files=[{splits['test']}]",
        "max_steps=400", "eval_interval=5", "optimizer.lr=3e-3", "optimizer.warmup_ratio=0",
        "block_size=64", "eval/probes=[]", "checkpoint.enabled=false", "hardware.estimate_memory=false",
        "model=tiny_random",  # learns from the four passages at once, then overfits them (pretrained: it only forgets)
    ]  # fmt: skip


@pytest.fixture(scope="module")
def early_stopped(tmp_path_factory) -> dict[str, dict]:
    """The overfitting run stopped early, once evaluated on the best weights and once on the last."""
    root = tmp_path_factory.mktemp("early")
    args = [*overfit_args(root), "early_stopping.patience=3"]
    for job, weights in enumerate(("best", "last")):  # -m eval.weights=best,last
        run_here([*args, f"eval.weights={weights}"], root / "sweep" / str(job), sweep=root / "sweep")
    records = [record_of(root / "sweep" / job) for job in ("0", "1")]
    return {r["config"]["eval"]["weights"]: r for r in records}


def test_early_stopping_restores_the_best_weights(early_stopped):
    r = early_stopped["best"]
    train = r["train"]
    assert train["stop_reason"] == "early_stop"
    assert train["steps"] < train["planned_steps"] == 400
    curve = {v["step"]: v["loss"] for v in train["validation_curve"]}
    best_step = min(curve, key=curve.get)
    assert train["best_step"] == best_step
    # three validations after the best, none better: that is what stopped it
    assert train["steps"] == best_step + 3 * 5
    assert train["final_weights"] == {"which": "best", "step": best_step}
    # the final evaluation ran on the restored best weights, not the last ones
    assert r["eval"]["final"]["validation"]["loss"] == pytest.approx(curve[best_step], rel=1e-6)
    assert r["eval"]["final"]["validation"]["loss"] < curve[train["steps"]]


def test_samples_without_prompts_continue_the_opening_words_of_validation_documents(early_stopped, tmp_path):
    from transfer.data.sources import load_texts
    from transfer.objectives.lm import opening_words

    r = early_stopped["best"]
    assert r["samples_from"] == "the opening words of validation documents"
    validation = load_texts(compose_config(overfit_args(tmp_path)).dataset)["validation"]
    assert [s["prompt"] for s in r["samples"]] == opening_words(validation) and len(r["samples"]) == 3
    assert all(len(s["prompt"].split()) == 6 and s["completion"] for s in r["samples"])


def test_last_weights_when_asked(early_stopped):
    best, last = early_stopped["best"], early_stopped["last"]
    # the same training (same seed, same stop), evaluated on the weights it stopped with
    assert last["train"]["validation_curve"] == best["train"]["validation_curve"]
    stop = last["train"]["steps"]
    assert last["train"]["final_weights"] == {"which": "last", "step": stop}
    assert last["train"]["stop_reason"] == "early_stop"
    final = last["eval"]["final"]["validation"]["loss"]
    assert final == pytest.approx(last["train"]["validation_curve"][-1]["loss"], rel=1e-6)
    assert final > best["eval"]["final"]["validation"]["loss"]


def test_record_has_reference_samples_memory_and_tensorboard(fast_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    r = record_of(fast_run)
    for when in ("baseline", "final"):
        ref = r["eval"][when]["ref_python_docs"]
        assert math.isfinite(ref["perplexity"])
        assert ref["tokens"] == 4096 - 4096 // 64  # the first token of each block is unscored
    for split in ("validation", "test"):  # eval.max_tokens=4096
        assert r["data"][split]["tokens"] == 4096 and r["data"][split]["sequences"] == 64
        assert r["eval"]["baseline"][split]["tokens"] == r["eval"]["final"][split]["tokens"] == 4096 - 64
    assert r["eval"]["change_pct"]["ref_python_docs"] == pytest.approx(
        100
        * (
            r["eval"]["final"]["ref_python_docs"]["perplexity"] / r["eval"]["baseline"]["ref_python_docs"]["perplexity"]
            - 1
        )
    )
    # the default probe is of the Rust prose's genre (technical documentation): the record says so
    assert r["eval"]["probes"]["ref_python_docs"] == {
        "source": "python_docs",
        "kind": "text",
        "format": "text",
        "genre": "technical documentation",
        "same_genre_as_training": True,
    }
    assert [s["prompt"] for s in r["samples"]] == [
        "In Rust, Vec<T> is",
        "The Result type in Rust",
        "Ownership in Rust means",
    ]
    assert all(len(s["completion"].encode()) <= 8 and len(s["completion_after"].encode()) <= 8 for s in r["samples"])
    assert json.loads((fast_run / "samples.json").read_text()) == r["samples"]
    assert r["memory"]["bytes"] > 50e6 and r["memory"]["kind"] in ("cpu_peak_rss", "cpu_peak_rss_process")
    assert (
        r["train"]["checkpoint"]["bytes"] == (fast_run / "checkpoints/step-000030/trainable.safetensors").stat().st_size
    )

    events = EventAccumulator(str(fast_run), size_guidance={"tensors": 0})
    events.Reload()
    assert {"ref_python_docs/perplexity", "final/validation_perplexity"} <= set(events.Tags()["scalars"])
    assert {"samples/0/text_summary", "samples/2/text_summary"} <= set(events.Tags()["tensors"])
    plugins = events.PluginTagToContent("hparams")
    assert "_hparams_/experiment" in plugins and "_hparams_/session_start_info" in plugins


def test_checkpoints_rotate_and_keep_the_best(fast_run):
    # checkpoint.interval=5, checkpoint.keep=2 over 30 steps
    folders = sorted(p.name for p in (fast_run / "checkpoints").iterdir())
    assert folders == ["best", "step-000025", "step-000030"]
    best = json.loads((fast_run / "checkpoints/best/best.json").read_text())
    assert best["step"] == record_of(fast_run)["train"]["best_step"]


# dropout on, so that the RNG state matters too
LORA = [*(a for a in FAST if not a.startswith("eval.probes.")), "max_steps=40", "eval_interval=20", "checkpoint.interval=10", "log_interval=1",
        "strategy=lora", "strategy.dropout=0.1", "eval/probes=[]"]  # fmt: skip


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory) -> Path:
    """A LoRA run straight through."""
    root = tmp_path_factory.mktemp("lora")
    run_here(LORA, root / "straight")
    return root / "straight"


def test_resume_under_another_config_is_refused(short_run, tmp_path):
    run = copy_run(short_run, tmp_path / "run")
    record = record_of(run)
    record["status"] = "running"
    (run / "metrics.json").write_text(json.dumps(record))
    # another learning rate, and other evaluation blocks: both change what the run measures
    args = [*SHORT, "optimizer.lr=1e-2", "eval.max_tokens=2048", "resume=true", "hydra.run.dir=run"]
    proc = run_cli(args, cwd=tmp_path)
    assert proc.returncode == 2  # refused before Hydra rewrites the folder's .hydra/
    assert proc.stderr.strip() == (
        "error: resume: run was run with optimizer.lr=0.001, this run has optimizer.lr=0.01 (2 differences); "
        "repeat the interrupted command's overrides and add resume=true"
    )
    # the checkpoint keeps its own copy of the config: resume=PATH from another folder is compared with it
    args = [*SHORT, "optimizer.lr=1e-2", f"resume={run}", "hydra.run.dir=other"]
    proc = run_cli(args, cwd=tmp_path)
    assert proc.returncode == 1
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if "error:" in line]
    assert len(errors) == 1
    assert "was made with optimizer.lr=0.001, this run has optimizer.lr=0.01 (1 difference)" in errors[0]


def test_resume_accepts_a_checkpoint_made_with_other_loss_chunks(tmp_path):
    from transfer.config.folders import resumable_config
    from transfer.training.checkpoint import CONFIG_FILE
    from transfer.training.restore import check_same_config

    cfg = compose_config([])
    saved = resumable_config(cfg)
    saved["hardware"]["loss_chunk_tokens"] = 0  # as saved before the default became 4096
    (tmp_path / CONFIG_FILE).write_text(json.dumps(saved))
    check_same_config(tmp_path, cfg)  # the order of float sums is all that differs
    saved["optimizer"]["lr"] = 1.0
    (tmp_path / CONFIG_FILE).write_text(json.dumps(saved))
    with pytest.raises(TransferError, match=r"was made with optimizer.lr=1.0, .* \(1 difference\)"):
        check_same_config(tmp_path, cfg)


def test_peft_checkpoint_loads_with_peft_and_scores_the_same(lora_run):
    from peft import PeftModel

    r = record_of(lora_run)
    last = lora_run / "checkpoints" / "step-000040"
    assert (last / "adapter_config.json").is_file()
    assert r["train"]["checkpoint"]["bytes"] == (last / "adapter_model.safetensors").stat().st_size
    # the final evaluation ran on the best weights; peft loads them from checkpoints/best/
    best = lora_run / "checkpoints" / "best"
    assert json.loads((best / "best.json").read_text())["step"] == r["train"]["final_weights"]["step"]
    cfg = compose_config(LORA)
    base, tokenizer = load_model_and_tokenizer(cfg.model, cfg.block_size)
    model = PeftModel.from_pretrained(base, best)
    objective = build_objective(cfg, tokenizer)
    splits = objective.prepare(cfg.eval.max_tokens)
    result = objective.evaluate(model, splits["validation"], cfg.eval_batch_size, resolve(cfg.hardware), "check")
    assert result["loss"] == pytest.approx(r["eval"]["final"]["validation"]["loss"], rel=1e-6)


def test_resumed_sweep_skips_completed_jobs_and_finishes_the_others(two_job_sweep, tmp_path):
    sweep = copy_run(two_job_sweep, tmp_path / "sweep")
    done, interrupted = sweep / "0", sweep / "1"
    done_bytes = (done / "metrics.json").read_bytes()
    record = record_of(interrupted)
    # as a job killed between its checkpoints of steps 10 and 20 leaves it
    shutil.rmtree(interrupted / "checkpoints" / "step-000020")
    (interrupted / "metrics.json").write_text(json.dumps({**record, "status": "running"}))
    proc = run_cli([*SWEEP, "resume=true", f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (done / "metrics.json").read_bytes() == done_bytes  # skipped, untouched
    again = record_of(interrupted)
    assert again["status"] == "completed" and again["train"]["resumed_from_step"] == 10
    # steps 11 to 20 trained again from the checkpoint: the same losses, the same result
    for a, b in zip(again["train"]["loss_curve"], record["train"]["loss_curve"], strict=True):
        assert a["step"] == b["step"] and a["loss"] == pytest.approx(b["loss"], rel=1e-6)
    assert again["eval"]["final"]["validation"]["loss"] == pytest.approx(
        record["eval"]["final"]["validation"]["loss"], rel=1e-6
    )


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
        "eval/probes=[wikitext]", f"eval.probes.wikitext.files=[{shared / 'datasets' / 'wikitext2_raw' / 'test.jsonl'}]",
        "eval.probes.wikitext.max_tokens=20000", "max_steps=40", "eval_interval=20", "block_size=128",
        "optimizer.lr=1e-3", "hardware.estimate_memory=false",  # the estimate is not read here
        "eval.max_tokens=16384",  # a third to a half of validation and test: perplexity 54 -> 13 on all of them
    ]  # fmt: skip
    r = run_here(args, tmp_path / "run")  # what the run computes and records: no process of its own needed
    assert r["status"] == "completed", r.get("error")
    base, final = r["eval"]["baseline"], r["eval"]["final"]
    assert final["validation"]["perplexity"] < 0.8 * base["validation"]["perplexity"]
    assert final["test"]["perplexity"] < base["test"]["perplexity"]
    assert (
        base["ref_wikitext"]["tokens"] == final["ref_wikitext"]["tokens"] == 20000 - 157
    )  # 157 blocks: first tokens unscored
    assert math.isfinite(final["ref_wikitext"]["perplexity"])


def test_evaluation_is_deterministic_under_no_grad():
    cfg = compose_config(["block_size=64"])
    model, tokenizer = load_model_and_tokenizer(cfg.model, 64)
    objective = build_objective(cfg, tokenizer)
    splits = objective.prepare(None)
    model.train()
    a = objective.evaluate(model, splits["test"], 8, resolve(cfg.hardware), "a")
    b = objective.evaluate(model, splits["test"], 32, resolve(cfg.hardware), "b")
    assert model.training, "evaluation must hand the model back in the mode it found it"
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
    assert all(p.grad is None for p in model.parameters())
    assert torch.is_grad_enabled()


def test_an_evaluator_in_the_registry_is_run_at_baseline_and_final_and_recorded(tmp_path, monkeypatch):
    """The evaluator seam: one registry entry, and its scores are in eval.baseline, eval.final and eval.change;
    one that does not score keeps its final result under its own name."""
    from transfer import evaluation
    from transfer.run import run_experiment

    seen = []

    def tokens_seen(subject, when, before=None):  # scores: {name: {metric: value}}
        seen.append(when)
        return {"count": {"sequences": float(len(subject.splits["validation"]))}}

    def notes(subject, when, before=None):
        return "untrained" if when == "baseline" else f"{before} -> trained"

    extra = {"tokens_seen": evaluation.Evaluator(tokens_seen), "notes": evaluation.Evaluator(notes, scores=False)}
    monkeypatch.setattr(evaluation, "EVALUATORS", {**evaluation.EVALUATORS, **extra})
    r = run_experiment(compose_config([*SHORT, "max_steps=2", "eval.max_tokens=1024", "checkpoint.enabled=false",
                                       "logging.loggers=[]"]), tmp_path / "run", {})  # fmt: skip
    assert r["status"] == "completed" and seen == ["baseline", "final"]
    assert r["eval"]["baseline"]["count"] == r["eval"]["final"]["count"] == {"sequences": 16.0}  # 1024 tokens / 64
    assert r["eval"]["change"]["count"] == {"sequences": 0.0}
    assert list(r["eval"]["final"]) == ["validation", "test", "count"]  # the registry's order
    assert r["notes"] == "untrained -> trained"
    assert not list((tmp_path / "run").glob("events.out.tfevents.*"))  # no logger asked for: no event file

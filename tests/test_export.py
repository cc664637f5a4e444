"""`python -m transfer.export`: a run's tuned model as a plain Hugging Face folder, checked against the run.

Four short real runs (LoRA with best weights, DoRA, IA3, full fine-tuning), trained in this process and
shared by the module; every export loads with transformers alone and must compute what the run's
adapted model computes.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import SHORT
from transformers import AutoModelForCausalLM, AutoTokenizer

from transfer.export import check_export, count, main, pick_weights, read_run, rebuild, run_config

QUICK = [*SHORT, "max_steps=6", "hardware.estimate_memory=false", "eval.max_new_tokens=2"]
RUNS = {  # rates that move six steps' weights well clear of the tolerances below
    "lora": [*QUICK, "strategy=lora", "optimizer.lr=1e-3", "eval_interval=3"],  # final weights: the best
    "dora": [*QUICK, "strategy=dora", "optimizer.lr=1e-3"],
    "ia3": [*QUICK, "strategy=ia3", "optimizer.lr=1e-2"],  # scaling vectors start at 1: a larger step
    "full": [*QUICK, "optimizer.lr=3e-4"],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    from transfer.run import run_experiment
    from transfer.validate import compose_config

    root = tmp_path_factory.mktemp("export_runs")
    for name, overrides in RUNS.items():
        run_experiment(compose_config(overrides), root / name, choices={}, overrides=overrides)
    return {name: root / name for name in RUNS}


def adapted(run: Path):
    """The run's model with its final weights, as the run held it (adapter unmerged)."""
    record = read_run(run)
    return rebuild(run_config(record, run), pick_weights(record, run, None))


def base_model(run: Path):
    """The model the run started from: no strategy, no training."""
    from transfer.models import load_model_and_tokenizer

    cfg = run_config(read_run(run), run)
    return load_model_and_tokenizer(cfg.model, cfg.block_size)[0]


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def batch() -> torch.Tensor:
    return torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module", params=["lora", "dora", "ia3"])
def merged(request, runs, tmp_path_factory) -> tuple[str, Path]:
    out = tmp_path_factory.mktemp(f"merged_{request.param}") / "model"
    assert main([str(runs[request.param]), "--merge", "--out", str(out)]) == 0
    return request.param, out


def test_a_merged_adapter_leaves_a_plain_model_that_computes_what_the_adapted_one_did(merged, runs):
    name, out = merged
    model = AutoModelForCausalLM.from_pretrained(out)  # transformers alone: no transfer, no peft
    assert model.dtype == torch.float32
    peft_modules = [n for n, m in model.named_modules() if "lora" in n or type(m).__module__.startswith("peft")]
    assert peft_modules == []
    assert not (out / "adapter_config.json").exists()
    base = base_model(runs[name])
    assert count(model) == count(base)
    assert sorted(model.state_dict()) == sorted(base.state_dict())
    tuned, _ = adapted(runs[name])
    assert hasattr(tuned, "peft_config")
    # fp32's tolerance (atol 1e-5, rtol 1.3e-6): (W + BA)x and Wx + B(Ax) round differently, ~1e-6 of a logit
    torch.testing.assert_close(logits(model, batch()), logits(tuned, batch()), atol=1e-5, rtol=1.3e-6)
    assert not torch.allclose(logits(model, batch()), logits(base, batch()), atol=1e-3)  # the adapter did something
    info = json.loads((out / "export.json").read_text())
    record = read_run(runs[name])
    assert info["merged"] is True and info["strategy"] == name and info["parameters"] == count(base)
    assert {k: info["weights"][k] for k in ("which", "step")} == record["train"]["final_weights"]


def test_the_merged_models_perplexity_is_the_one_the_run_recorded(merged, runs):
    name, out = merged
    result = check_export(out)
    final = read_run(runs[name])["eval"]["final"]["validation"]
    assert result["recorded"] == final["perplexity"]
    assert result["tokens"] == final["tokens"]
    assert result["measured"] == pytest.approx(final["perplexity"], rel=1e-4)
    assert result["agree"]


def test_the_tokenizer_round_trips_through_the_export(merged, runs):
    _, out = merged
    _, tokenizer = adapted(runs["lora"])
    loaded = AutoTokenizer.from_pretrained(out)
    text = 'fn main() { println!("héllo, wörld 🙂"); }\n<|endoftext|>'
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert loaded.decode(loaded(text)["input_ids"]) == text
    assert (loaded.eos_token_id, loaded.pad_token_id, len(loaded)) == (
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
        len(tokenizer),
    )


def test_export_check_on_the_command_line_reports_both_figures(runs, tmp_path, capsys):
    out = tmp_path / "checked"
    assert main([str(runs["lora"]), "--merge", "--out", str(out), "--check"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    recorded = read_run(runs["lora"])["eval"]["final"]["validation"]["perplexity"]
    assert lines[-2].startswith(f"wrote {out}: Qwen2ForCausalLM merged model, {count(base_model(runs['lora'])):,}")
    assert lines[-1].startswith(f"check: validation perplexity {recorded:.6f} recorded, ")
    assert lines[-1].endswith(": agree")


def test_full_fine_tuning_exports_the_whole_tuned_model(runs, capsys):
    run = runs["full"]
    assert main([str(run), "--merge", "--check"]) == 0  # the default folder
    output = capsys.readouterr().out
    assert "--merge: nothing to merge, strategy=full" in output
    out = run / "export"
    model = AutoModelForCausalLM.from_pretrained(out)
    tuned, _ = adapted(run)
    base = base_model(run)
    assert count(model) == count(base)
    assert torch.equal(logits(model, batch()), logits(tuned, batch()))
    assert not torch.allclose(logits(model, batch()), logits(base, batch()), atol=1e-3)
    info = json.loads((out / "export.json").read_text())
    assert (info["merged"], info["format"], info["weights"]["which"]) == (False, "model", "last")
    assert output.strip().splitlines()[-1].endswith(": agree")


def test_an_unmerged_adapter_loads_over_its_base_with_peft(runs, tmp_path):
    from peft import PeftModel

    out = tmp_path / "adapter"
    assert main([str(runs["dora"]), "--out", str(out)]) == 0
    base = AutoModelForCausalLM.from_pretrained(out / "base")
    assert count(base) == count(base_model(runs["dora"]))
    model = PeftModel.from_pretrained(base, out).eval()
    tuned, _ = adapted(runs["dora"])
    torch.testing.assert_close(logits(model, batch()), logits(tuned, batch()), atol=1e-6, rtol=0)
    assert check_export(out)["agree"]


# ---------------------------------------------------------------- refusals: one line, exit 2, nothing written
def refused(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert len(captured.err.strip().splitlines()) == 1, captured.err
    return captured.err


def edited_copy(run: Path, to: Path, change) -> Path:
    """A copy of a run folder whose record `change` edits (without the exports other tests wrote in it)."""
    shutil.copytree(run, to, ignore=shutil.ignore_patterns("export*"))
    record = json.loads((to / "metrics.json").read_text())
    change(record)
    (to / "metrics.json").write_text(json.dumps(record))
    return to


def test_a_run_that_did_not_complete_is_refused(runs, tmp_path, capsys):
    run = edited_copy(runs["full"], tmp_path / "run", lambda r: r.update(status="failed", error="out of memory"))
    err = refused([str(run), "--merge"], capsys)
    assert f"{run} holds a run with status 'failed': out of memory; allowed: a run that completed" in err
    assert not (run / "export").exists() and not (run / "export-merged").exists()


def test_an_existing_output_folder_is_not_overwritten(runs, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    err = refused([str(runs["lora"]), "--merge", "--out", str(out)], capsys)
    assert f"{out} exists and is not an empty folder" in err
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"


def test_a_folder_without_a_record_or_without_its_weights_is_named(runs, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert f"{tmp_path / 'empty'} holds no metrics.json" in refused([str(tmp_path / "empty")], capsys)
    run = edited_copy(runs["full"], tmp_path / "run", lambda r: None)
    step = read_run(run)["train"]["steps"]
    shutil.rmtree(run / "checkpoints")
    err = refused([str(run)], capsys)
    assert f"the last weights (step {step}) are not on disk: {run}/checkpoints/step-{step:06d} is missing" in err
    assert not (run / "export").exists()


def test_best_weights_of_a_run_that_never_validated_and_qlora_are_refused(runs, tmp_path, capsys):
    err = refused([str(runs["full"]), "--weights", "best", "--out", str(tmp_path / "x")], capsys)
    assert "kept no best weights" in err and "allowed: --weights last" in err
    run = edited_copy(runs["lora"], tmp_path / "qlora", lambda r: r["config"]["strategy"].update(name="qlora"))
    assert "strategy=qlora is not exported: its adapter was trained on a 4-bit NF4 base" in refused(
        [str(run), "--merge"], capsys
    )
    assert not (tmp_path / "x").exists() and not (run / "export-merged").exists()


def test_a_run_whose_model_no_longer_rebuilds_alike_is_refused(runs, tmp_path, capsys):
    record = read_run(runs["full"])
    total = record["params"]["total"]
    run = edited_copy(runs["full"], tmp_path / "run", lambda r: r["params"].update(total=total + 1))
    err = refused([str(run)], capsys)
    assert f"rebuilt, its model has {total:,} parameters where the run had {total + 1:,}" in err
    assert not (run / "export").exists()

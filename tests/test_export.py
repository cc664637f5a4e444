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
    from transfer.config.compose import compose_config
    from transfer.run import run_experiment

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
    from transfer.models.load import load_model_and_tokenizer

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


def plain_perplexity(folder: Path, record: dict) -> tuple[float, int]:
    """An exported model's validation perplexity and scored tokens by transformers alone, no transfer code: the run's
    validation documents, each ended by end-of-text, cut to its eval.max_tokens and into blocks of block_size."""
    import math

    import transfer

    cfg = record["config"]
    assert cfg["dataset"]["name"] == "rust_concepts" and cfg["objective"]["name"] == "lm"
    model, tokenizer = AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    lines = (Path(transfer.__file__).parent / "corpora" / "rust_concepts" / "validation.jsonl").read_text().splitlines()
    ids = [i for line in lines for i in [*tokenizer(json.loads(line)["text"])["input_ids"], tokenizer.eos_token_id]]
    ids, size = ids[: cfg["eval"]["max_tokens"]], cfg["block_size"]
    total, scored = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids), size):
            block = torch.tensor(ids[start : start + size])
            logits = model(block[None]).logits[0, :-1].double()
            total += torch.nn.functional.cross_entropy(logits, block[1:], reduction="sum").item()
            scored += len(block) - 1
    return math.exp(total / scored), scored


def test_the_merged_models_perplexity_is_the_one_the_run_recorded(merged, runs):
    name, out = merged
    result = check_export(out)
    final = read_run(runs[name])["eval"]["final"]["validation"]
    # the exported folder, scored by transformers alone, gives the figure the run recorded for its own model
    perplexity, scored = plain_perplexity(out, read_run(runs[name]))
    assert scored == final["tokens"] and perplexity == pytest.approx(final["perplexity"], rel=1e-6)
    assert result["recorded"] == {"perplexity": final["perplexity"]}
    assert result["measured_count"] == final["tokens"]
    assert result["measured"]["perplexity"] == pytest.approx(final["perplexity"], rel=1e-4)
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


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_a_chat_tokenizers_template_and_added_special_tokens_survive_the_export(tmp_path):
    """A tokenizer as chat models ship one (added special tokens, a chat template), in a model folder of its own,
    through a LoRA run and a merged export: the exported tokenizer keeps both and renders a chat to the same ids."""
    from transfer.config.compose import compose_config
    from transfer.models.load import build_model, byte_tokenizer, tiny_config
    from transfer.run import run_experiment

    tokenizer = byte_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHATML
    folder = tmp_path / "chat-model"
    shape = tiny_config(compose_config(["model=tiny_random"]).model.tiny, tokenizer)
    build_model(shape, seed=0).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    overrides = [*QUICK, "max_steps=2", "model=local", f"model.name_or_path={folder}", "strategy=lora"]
    record = run_experiment(compose_config(overrides), tmp_path / "run", choices={}, overrides=overrides)
    assert record["status"] == "completed", record["error"]
    assert main([str(tmp_path / "run"), "--merge", "--out", str(tmp_path / "export")]) == 0
    loaded = AutoTokenizer.from_pretrained(tmp_path / "export")
    assert loaded.chat_template == CHATML
    assert loaded.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [257, 258] and len(loaded) == 259
    assert {"<|im_start|>", "<|im_end|>"} <= set(loaded.all_special_tokens)
    chat = [{"role": "user", "content": "Answer <|im_end|> or héllo 🙂"}, {"role": "assistant", "content": "héllo"}]
    ids = loaded.apply_chat_template(chat, add_generation_prompt=True)["input_ids"]
    assert ids == tokenizer.apply_chat_template(chat, add_generation_prompt=True)["input_ids"]
    # each marker one token: <|im_start|> opens two turns and the generation prompt, <|im_end|> closes two turns and
    # stands in the user's text
    assert ids.count(257) == 3 and ids.count(258) == 3
    assert loaded.decode(ids, skip_special_tokens=True) == "user\nAnswer  or héllo 🙂\nassistant\nhéllo\nassistant\n"


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


def test_merging_an_adapter_its_strategy_row_calls_not_mergeable_is_refused(runs, tmp_path, capsys, monkeypatch):
    from transfer.config.strategy import STRATEGIES, StrategySpec

    monkeypatch.setitem(STRATEGIES, "ia3", StrategySpec(peft=True, update="ia3"))  # as if IA3 did not fold
    err = refused([str(runs["ia3"]), "--merge", "--out", str(tmp_path / "x")], capsys)
    assert "--merge: strategy=ia3's adapter does not fold into the base weights; allowed: its export without" in err
    assert not (tmp_path / "x").exists()


def test_a_run_whose_model_no_longer_rebuilds_alike_is_refused(runs, tmp_path, capsys):
    record = read_run(runs["full"])
    total = record["params"]["total"]
    run = edited_copy(runs["full"], tmp_path / "run", lambda r: r["params"].update(total=total + 1))
    err = refused([str(run)], capsys)
    assert f"rebuilt, its model has {total:,} parameters where the run had {total + 1:,}" in err
    assert not (run / "export").exists()


def _final_folder(run: Path) -> Path:
    step = read_run(run)["train"]["final_weights"]["step"]
    return run / "checkpoints" / f"step-{step:06d}"


def test_weights_linked_in_from_another_run_are_refused(runs, tmp_path, capsys):
    """A step checkpoint replaced by a link to another run's (or a weights file linked in): not this run's weights."""
    run = edited_copy(runs["full"], tmp_path / "run", lambda r: None)
    other = edited_copy(runs["full"], tmp_path / "other", lambda r: None)
    folder = _final_folder(run)
    shutil.rmtree(folder)
    folder.symlink_to(_final_folder(other), target_is_directory=True)
    assert f"{folder} leads out of the run ({_final_folder(other)})" in refused([str(run)], capsys)
    folder.unlink()
    shutil.copytree(_final_folder(other), folder)
    (folder / "trainable.safetensors").unlink()
    (folder / "trainable.safetensors").symlink_to(_final_folder(other) / "trainable.safetensors")
    assert f"{folder / 'trainable.safetensors'} leads out of the run" in refused([str(run)], capsys)
    assert not (run / "export").exists()


def test_another_runs_checkpoint_copied_in_is_refused(runs, tmp_path, capsys):
    """A checkpoint copied from a run of other settings: its own config says it is not this run's."""
    run = edited_copy(runs["full"], tmp_path / "run", lambda r: r["config"].update(seed=r["config"]["seed"] + 1))
    err = refused([str(run)], capsys)
    assert f"was made with seed={read_run(runs['full'])['config']['seed']}, the run has seed=" in err
    assert "it is another run's checkpoint" in err


def test_a_weights_file_the_manifest_does_not_list_is_refused(runs, tmp_path, capsys):
    run = edited_copy(runs["full"], tmp_path / "run", lambda r: None)
    shutil.copy(_final_folder(run) / "trainable.safetensors", _final_folder(run) / "model.safetensors")
    err = refused([str(run)], capsys)
    assert "model.safetensors: not written with the checkpoint (its manifest does not list it)" in err


def test_a_record_whose_strategy_does_not_match_its_checkpoint_is_refused(runs, tmp_path, capsys):
    run = edited_copy(runs["full"], tmp_path / "run", lambda r: r["config"]["strategy"].update(name="lora"))
    run_config_file = _final_folder(run) / "run_config.json"
    saved = json.loads(run_config_file.read_text())
    saved["strategy"] = read_run(run)["config"]["strategy"]  # as if the checkpoint too said lora
    run_config_file.write_text(json.dumps(saved))
    manifest = json.loads((_final_folder(run) / "manifest.json").read_text())
    manifest["files"].pop("run_config.json")
    (_final_folder(run) / "manifest.json").write_text(json.dumps(manifest))
    err = refused([str(run), "--out", str(tmp_path / "out")], capsys)
    assert "holds the model's own weights, but the run's strategy trains a peft adapter" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("where", ["out", "tmp"])
def test_an_output_or_temporary_path_that_is_a_link_is_refused(runs, tmp_path, capsys, where):
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    elsewhere.mkdir()
    (out if where == "out" else tmp_path / ".out.tmp").symlink_to(elsewhere)
    err = refused([str(runs["full"]), "--out", str(out)], capsys)
    assert f"is a link (to {elsewhere}); allowed: a new or empty folder" in err
    assert list(elsewhere.iterdir()) == []
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    assert "is a link" in refused([str(runs["full"]), "--out", str(tmp_path / "dangling")], capsys)


def test_weights_that_find_no_place_of_their_name_and_shape_are_named(runs):
    """A checkpoint of the 4-block model into a 2-block one of another width: refused, naming what does not fit (a
    load that skipped them would leave part of the model as it was)."""
    from transfer.config.compose import compose_config
    from transfer.errors import TransferError
    from transfer.models.load import load_model_and_tokenizer
    from transfer.training.checkpoint import load_weights

    cfg = compose_config(["model=tiny_random", "model.tiny.num_layers=2", "model.tiny.hidden_size=64"])
    small, _ = load_model_and_tokenizer(cfg.model, 64)
    with pytest.raises(TransferError, match=r"does not fit this model: \d+ of its \d+ tensors have no place") as e:
        load_weights(_final_folder(runs["full"]), small)
    assert "(no such tensor here)" in str(e.value) or "where the model's is" in str(e.value)

"""`python -m transfer.chat RUN`: a run's model as it was trained (template, weights, adapter unmerged), checked against
greedy generation from the exported model, and its refusals.

One short LoRA SFT run on the pretrained tiny model given a chat tokenizer (ChatML, as Qwen's), trained in this
process and shared by the module.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import SHORT
from transformers import AutoModelForCausalLM

from transfer.chat import Settings, converse, load, main
from transfer.export import export, load_export

INSTRUCTIONS = Path(__file__).parent / "data" / "instructions.jsonl"
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PROMPTS = ["What does cargo do?", "Name a Rust keyword.", "Is 17 even or odd?"]
NEW = 10  # new tokens: enough for answers to differ, few enough to stay cheap


def chat_model(folder: Path) -> Path:
    """The pretrained tiny model's weights in a model folder with a chat tokenizer (two added special tokens and a
    ChatML template: the vocabulary's padding has room for them)."""
    from transfer.config.compose import compose_config
    from transfer.models.load import byte_tokenizer, load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(compose_config(["model=tiny"]).model, 64)
    tokenizer = byte_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHATML
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def sft_overrides(model: Path) -> list[str]:
    return [*SHORT, "model=local", f"model.name_or_path={model}", "objective=sft", "dataset=text_files",
            f"dataset.train_files=[{INSTRUCTIONS}]"]  # fmt: skip


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    from transfer.config.compose import compose_config
    from transfer.run import run_experiment

    root = tmp_path_factory.mktemp("chat_run")
    overrides = [*sft_overrides(chat_model(root / "model")), "max_steps=4", "strategy=lora", "optimizer.lr=3e-3",
                 "eval.max_new_tokens=2"]  # fmt: skip
    record = run_experiment(compose_config(overrides), root / "run", choices={}, overrides=overrides)
    assert record["status"] == "completed", record.get("error")
    return root / "run"


def greedy(model, tokenizer, messages: list[dict]) -> list[int]:
    """Greedy new tokens by transformers alone: the ChatML prompt, stopping at end-of-text or <|im_end|>."""
    ids = torch.tensor([tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]])
    stops = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False,
                             eos_token_id=stops, pad_token_id=tokenizer.eos_token_id)  # fmt: skip
    return out[0, ids.shape[1] :].tolist()


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_batch_form_answers_as_the_exported_model_does_token_for_token(run, tmp_path):
    prompts = tmp_path / "questions.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n\n")  # a blank line is no prompt
    assert main([str(run), "--prompts", str(prompts), "--max-new-tokens", str(NEW)]) == 0
    tuned = rows(run / "chat" / "questions.jsonl")
    assert main([str(run), "--prompts", str(prompts), "--max-new-tokens", str(NEW), "--base"]) == 0
    base = rows(run / "chat" / "questions-base.jsonl")

    exported = export(run, out=tmp_path / "export")
    assert exported["format"] == "adapter"  # LoRA unmerged: peft over its base, as chat holds it
    model, tokenizer = load_export(tmp_path / "export")
    untrained = AutoModelForCausalLM.from_pretrained(run.parent / "model").eval()
    for prompt, row, base_row in zip(PROMPTS, tuned, base, strict=True):
        messages = [{"role": "user", "content": prompt}]
        assert row["prompt"] == prompt and row["messages"] == messages
        assert row["completion_ids"] == greedy(model, tokenizer, messages)
        assert row["completion"] == tokenizer.decode(row["completion_ids"], skip_special_tokens=True)
        assert base_row["completion_ids"] == greedy(untrained, tokenizer, messages)
    # the run's weights are what answered: the tuned model does not say what the untrained one does
    assert [r["completion_ids"] for r in tuned] != [r["completion_ids"] for r in base]
    assert (tuned[0]["base"], base[0]["base"]) == (False, True)


def test_the_batch_form_never_writes_over_an_earlier_file(run, tmp_path, capsys):
    prompts = tmp_path / "again.jsonl"
    prompts.write_text(json.dumps({"prompt": PROMPTS[0]}) + "\n" + json.dumps({"messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPTS[1]}]}) + "\n")  # fmt: skip
    args = [str(run), "--prompts", str(prompts), "--max-new-tokens", "2"]
    assert main(args) == 0 and main(args) == 0
    first, second = rows(run / "chat" / "again.jsonl"), rows(run / "chat" / "again-2.jsonl")
    assert first == second and len(first) == 2  # greedy: the same answers, in a second file
    assert first[1]["messages"][0] == {"role": "system", "content": "Be brief."}
    before = (run / "chat" / "again.jsonl").read_text()
    capsys.readouterr()
    assert main([*args, "--out", str(run / "chat" / "again.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--out {run / 'chat' / 'again.jsonl'} exists" in err
    assert (run / "chat" / "again.jsonl").read_text() == before


def test_the_conversation_so_far_frames_each_turn(run, capsys):
    talker = load(run)
    settings = Settings(max_new_tokens=4)
    lines = iter(["Hi there", "", "And then?", "/reset", "Bye"])

    def read(prompt):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    messages = converse(talker, settings, "Be brief.", read)
    system = {"role": "system", "content": "Be brief."}
    first = talker.reply([system, {"role": "user", "content": "Hi there"}], settings)["completion"]
    history = [system, {"role": "user", "content": "Hi there"}, {"role": "assistant", "content": first},
               {"role": "user", "content": "And then?"}]  # fmt: skip
    ids = talker.prompt_ids(history)
    assert ids == talker.tokenizer.apply_chat_template(history, add_generation_prompt=True)["input_ids"]
    second = talker.reply(history, settings)["completion"]
    last = talker.reply([system, {"role": "user", "content": "Bye"}], settings)["completion"]  # after /reset
    assert messages == [system, {"role": "user", "content": "Bye"}, {"role": "assistant", "content": last}]
    shown = capsys.readouterr().out
    assert shown.count("model> ") == 3 and f"model> {second}" in shown and "(history cleared)" in shown


def refused(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    return err


def test_a_bad_run_is_refused_in_one_line_naming_it(run, tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert f"{missing} is not a folder; allowed: a run folder" in refused([str(missing)], capsys)
    assert f"{tmp_path} holds no metrics.json" in refused([str(tmp_path)], capsys)
    weightless = shutil.copytree(run, tmp_path / "weightless", ignore=shutil.ignore_patterns("chat", "checkpoints"))
    err = refused([str(weightless)], capsys)
    assert "weights (step 4) are not on disk" in err and str(weightless / "checkpoints") in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"question": "no prompt"}\n')
    assert f"{bad}:2: allowed: " in refused([str(run), "--prompts", str(bad)], capsys)
    assert not (run / "chat" / "bad.jsonl").exists()

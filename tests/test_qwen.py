"""The real Qwen2.5-Coder-0.5B-Instruct (`make qwen`; skipped without it): its chat template's masks, its parameter
counts against the folder's own file, and a LoRA run that exports and checks. Its weights were quantized to about
4 bits before being dequantized to bf16 (docs/qwen.md): what is tested here is architecture, tokenizer and template,
which the quantization did not touch."""

import json
import math
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from transfer.config.compose import compose_config
from transfer.data.sequences import IGNORE

QWEN = ["model=qwen2_5_coder_0_5b", "hardware=cpu", "hardware.estimate_memory=false", "eval/probes=[]",
        "logging.loggers=[]"]  # fmt: skip
# Two assistant turns, each answer's words also in a prompt (a search of the text would find the prompt's), one
# conversation with a system message and one where the template writes its default one.
CONVERSATIONS = [
    [
        {"role": "user", "content": "Does Vec<T> own its buffer? Answer Yes or No."},
        {"role": "assistant", "content": "Yes"},
        {"role": "user", "content": "Does &[T] own its buffer? No means it borrows."},
        {"role": "assistant", "content": "No, it borrows."},
    ],
    [
        {"role": "system", "content": "Answer in one line."},
        {"role": "user", "content": "What does `let mut x = 5;` declare?"},
        {"role": "assistant", "content": "A mutable binding `x` of 5."},
    ],
]


def safetensors_shapes(file: Path) -> dict[str, list[int]]:
    """Each tensor's shape, from the file's own header (its first 8 bytes say the header's length)."""
    with open(file, "rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        return {k: v["shape"] for k, v in json.loads(fh.read(length)).items() if k != "__metadata__"}


def test_the_folder_comes_from_its_variable_and_a_missing_one_says_how_to_build_it(monkeypatch, tmp_path):
    from transfer.config.checks import check_config
    from transfer.errors import TransferError

    monkeypatch.delenv("TRANSFER_QWEN2_5_CODER", raising=False)
    monkeypatch.setenv("TRANSFER_MODELS", str(tmp_path / "models"))  # where the build script puts it
    cfg = compose_config(["model=qwen2_5_coder_0_5b"])
    assert cfg.model.name_or_path == str(tmp_path / "models" / "qwen2_5_coder_0_5b_instruct")
    monkeypatch.setenv("TRANSFER_QWEN2_5_CODER", str(tmp_path / "elsewhere"))  # over TRANSFER_MODELS
    cfg = compose_config(["model=qwen2_5_coder_0_5b"])
    with pytest.raises(TransferError) as e:
        check_config(cfg)
    assert str(e.value) == (
        f"model.name_or_path={str(tmp_path / 'elsewhere')!r} does not exist; build it with `make qwen`, or set "
        "TRANSFER_QWEN2_5_CODER to its folder"
    )
    # a folder given on the command line is the user's: no hint about building this one
    with pytest.raises(TransferError, match=r"does not exist; allowed: a model directory on disk or a hub name"):
        check_config(compose_config(["model=local", f"model.name_or_path={tmp_path / 'elsewhere'}"]))


def expected_ids_and_labels(text: str, tokenizer) -> tuple[list[int], list[int]]:
    """From the rendered ChatML text alone: each `<|im_start|>role\\n...<|im_end|>` turn tokenized by itself (the
    tokenizer splits at special tokens anyway), an assistant turn's content and its `<|im_end|>` scored."""
    encode = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    start, end = "<|im_start|>", "<|im_end|>"
    ids, labels = [], []
    for turn in text.split(start)[1:]:
        body, sep, rest = turn.partition(end)
        assert sep and rest in ("\n", ""), f"not a ChatML turn: {turn!r}"
        role, _, content = body.partition("\n")
        header, whole = encode(f"{role}\n"), encode(body)
        assert whole[: len(header)] == header  # the role's line is a token prefix of the turn's
        answer = role == "assistant"
        ids += [*encode(start), *whole, *encode(end), *encode(rest)]
        labels += [IGNORE] * (1 + len(header))
        labels += whole[len(header) :] if answer else [IGNORE] * (len(whole) - len(header))
        labels += encode(end) if answer else [IGNORE]
        labels += [IGNORE] * len(encode(rest))
    return ids, labels


def test_the_chat_templates_masks_are_the_answers_and_their_turn_end(qwen, tmp_path):
    from transformers import AutoTokenizer

    from transfer.objectives import build_objective

    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in CONVERSATIONS))
    files = [f"dataset.{split}_files=[{data}]" for split in ("train", "validation", "test")]
    cfg = compose_config([*QWEN, "objective=sft", "dataset=text_files", *files, "block_size=256"])
    tokenizer = AutoTokenizer.from_pretrained(qwen)
    train = build_objective(cfg, tokenizer).prepare(None)["train"]
    assert train.info["template"] == "chat"
    for i, conversation in enumerate(CONVERSATIONS):
        text = tokenizer.apply_chat_template(conversation, tokenize=False)
        assert text.count("<|im_start|>assistant\n") == sum(m["role"] == "assistant" for m in conversation)
        ids, labels = expected_ids_and_labels(text, tokenizer)
        got_ids, got_labels = train.get(i)
        assert got_ids.tolist() == ids
        assert got_labels.tolist() == labels
        scored = tokenizer.decode([t for t in labels if t != IGNORE])
        assert scored == "".join(f"{m['content']}<|im_end|>" for m in conversation if m["role"] == "assistant")
    # the template's default system prompt is there, and not scored
    assert "You are Qwen" in tokenizer.decode(train.get(0)[0])


def dry_run(tmp_path: Path, name: str, *overrides: str) -> dict:
    from transfer.run import run_experiment

    return run_experiment(
        compose_config([*QWEN, "dry_run=true", *overrides]), tmp_path / name, {"model": "qwen2_5_coder_0_5b"}
    )


def test_a_dry_runs_counts_are_the_folders(qwen, tmp_path):
    shapes = safetensors_shapes(qwen / "model.safetensors")
    in_file = {k: math.prod(shape) for k, shape in shapes.items()}
    config = json.loads((qwen / "config.json").read_text())
    assert config["tie_word_embeddings"] and "lm_head.weight" not in in_file  # the head is the embedding matrix
    full = dry_run(tmp_path, "full")["params"]
    assert full["total"] == full["trainable"] == sum(in_file.values()) == 494_032_768
    assert full["tied_embeddings"] is True and full["breakdown"]["head"] == 0
    assert full["breakdown"]["embeddings"] == in_file["model.embed_tokens.weight"] == 151_936 * 896
    # LoRA r=16 on all seven projections: r x (fan-in + fan-out) each, read from the folder's matrices
    lora = dry_run(tmp_path, "lora", "strategy=lora", "strategy.r=16")["params"]
    projections = [shape for k, shape in shapes.items() if k.endswith("_proj.weight")]
    assert len(projections) == 7 * config["num_hidden_layers"]
    adapters = sum(16 * sum(shape) for shape in projections)
    assert lora["trainable"] == lora["breakdown"]["peft"] == adapters == 8_798_208
    assert lora["total"] == 494_032_768 + 8_798_208


def test_a_few_lora_steps_export_merged_and_the_check_agrees(qwen, tmp_path, capsys):
    from transfer.export import main
    from transfer.run import run_experiment

    overrides = [*QWEN, "strategy=lora", "optimizer.lr=1e-3", "max_steps=2", "block_size=16", "micro_batch_size=1",
                 "eval_batch_size=2", "eval.max_tokens=32", "eval.max_new_tokens=1", "eval_interval=0"]  # fmt: skip
    record = run_experiment(compose_config(overrides), tmp_path / "run", {"model": "qwen2_5_coder_0_5b"}, overrides)
    assert record["status"] == "completed" and record["train"]["steps"] == 2
    out = tmp_path / "merged"
    assert main([str(tmp_path / "run"), "--merge", "--out", str(out), "--check"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    recorded = record["eval"]["final"]["validation"]["perplexity"]
    assert lines[-1].startswith(f"check: validation perplexity {recorded:.6f} recorded, ") and lines[-1].endswith(
        ": agree"
    )
    # a plain Qwen2 of the base's size, its tied matrix saved once, the adapter folded into the projections alone
    merged, base = safetensors_shapes(out / "model.safetensors"), safetensors_shapes(qwen / "model.safetensors")
    assert merged == base
    assert (out / "model.safetensors").stat().st_size < 4 * 494_032_768 + 2**20  # float32, no second head matrix
    with safe_open(out / "model.safetensors", "pt") as after, safe_open(qwen / "model.safetensors", "pt") as before:
        for name, changed in (("model.layers.0.self_attn.q_proj.weight", True), ("model.embed_tokens.weight", False)):
            assert torch.equal(after.get_tensor(name), before.get_tensor(name).float()) is not changed, name

"""The project's pretrained tiny model: a deterministic build, the shipped weights, real transfer by default."""

import hashlib
import json
import platform

import pytest
import torch
from conftest import run_here

from transfer.config.compose import compose_config
from transfer.data.probes import probe_splits
from transfer.errors import TransferError
from transfer.evaluation.perplexity import perplexity
from transfer.models.load import TINY_MANIFEST, TINY_WEIGHTS, load_model_and_tokenizer
from transfer.record import read_record
from transfer.tiny.build import corpora, digest, pretrain, save
from transfer.training.hardware import resolve


def test_build_is_deterministic(tmp_path):
    """The same corpus and settings give the same bytes: the weights can be rebuilt and checked."""
    from transfer.data.sources import python_docs_prose

    texts = python_docs_prose("train")[:40]
    torch.set_num_threads(1)
    first, curve = pretrain(texts, steps=3, block_size=64, batch=4, log_every=1)
    second, again = pretrain(texts, steps=3, block_size=64, batch=4, log_every=1)
    assert curve == again and len(curve) == 3
    assert save(first, tmp_path / "a.safetensors") == save(second, tmp_path / "b.safetensors")
    assert curve[-1]["loss"] < 5.6  # it learnt something in 3 steps: log(320) = 5.77 is a uniform guess


def test_shipped_weights_are_those_the_manifest_describes(shared):
    manifest = json.loads(TINY_MANIFEST.read_text())
    assert hashlib.sha256(TINY_WEIGHTS.read_bytes()).hexdigest() == manifest["weights_sha256"]
    found = corpora(shared)
    assert digest(found["tiny_shakespeare_train"]) == manifest["corpora"]["tiny_shakespeare_train"]["sha256"]
    if platform.python_version() == manifest["python"]:  # the documentation's text follows the Python version
        assert digest(found["python_docs_train"]) == manifest["corpora"]["python_docs_train"]["sha256"]
    assert TINY_WEIGHTS.stat().st_size < 2 * 2**20


def _probe_perplexity(overrides: list[str]) -> float:
    cfg = compose_config(["block_size=128", "eval.probes.python_docs.max_tokens=8192", *overrides])
    model, tokenizer = load_model_and_tokenizer(cfg.model, cfg.block_size)
    probe = probe_splits(cfg, tokenizer)["ref_python_docs"]
    return perplexity(model, probe, 32, resolve(cfg.hardware), tokenizer.pad_token_id)["perplexity"]


def test_pretrained_tiny_knows_english_and_the_random_one_does_not():
    """Held-out Python documentation prose (topics the build never read): a byte-level model that knows English."""
    pretrained, random = _probe_perplexity([]), _probe_perplexity(["model=tiny_random"])
    assert pretrained < 6 < 250 < random  # a uniform guess over 257 byte tokens would be 257


def test_pretrained_tiny_refuses_another_shape():
    cfg = compose_config(["model.tiny.hidden_size=64"])
    with pytest.raises(TransferError, match="model=tiny_random for any shape"):
        load_model_and_tokenizer(cfg.model, 64)
    cfg = compose_config(["model=tiny_random", "model.tiny.hidden_size=64"])
    model, _ = load_model_and_tokenizer(cfg.model, 64)
    assert model.config.hidden_size == 64


def test_default_run_shows_domain_gain_and_forgetting(shared, tmp_path):
    """Fine-tuning on Rust prose: the domain's perplexity falls, held-out general text's rises."""
    run_here(["eval/probes=[python_docs,shakespeare]", "max_steps=40", "eval_interval=0", "eval.max_tokens=4096",
              "eval.probes.python_docs.max_tokens=4096", "eval.probes.shakespeare.max_tokens=4096",
              "eval.max_new_tokens=4", "checkpoint.enabled=false", "hardware.estimate_memory=false"],
             tmp_path / "run")  # fmt: skip
    r = read_record(tmp_path / "run")
    change = r["eval"]["change_pct"]
    assert change["validation"] < -25 and change["test"] < -20  # domain gain
    assert change["ref_shakespeare"] > 5 and change["ref_python_docs"] > 0  # forgetting
    assert r["eval"]["probes"]["ref_shakespeare"]["same_genre_as_training"] is False
    assert r["model"]["name_or_path"] == "tiny (in the package)"


def _instruction_probe(tokenizer, shared):
    cfg = compose_config(["eval/probes=[instructions]", "block_size=1024", "eval.probes.instructions.max_tokens=4096",
                          f"eval.probes.instructions.files=[{shared / 'datasets/instruct_self_instruct/test.jsonl'}]"])  # fmt: skip
    return probe_splits(cfg, tokenizer)["ref_instructions"]


def test_an_instructions_probe_scores_only_the_answers_framed_as_the_model_is_asked(shared):
    """Plain framing for a model without a chat template; the chat template for one with it."""
    from transfer.data.sequences import IGNORE
    from transfer.models.load import byte_tokenizer

    tokenizer = byte_tokenizer()
    plain = _instruction_probe(tokenizer, shared)
    ids, labels = plain.get(0)
    text, scored = tokenizer.decode(ids), tokenizer.decode(ids[labels != IGNORE])
    assert text.startswith("### Instruction:\n") and "### Response:\n" in text
    assert scored and scored in text.split("### Response:\n", 1)[1]  # the answer, and nothing before it
    assert plain.info["template"] == "plain" and plain.tokens <= 4096
    tokenizer.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>{% endfor %}"
    chat = _instruction_probe(tokenizer, shared)
    ids, labels = chat.get(0)
    assert tokenizer.decode(ids).startswith("<user>") and chat.info["template"] == "chat"
    assert "<user>" not in tokenizer.decode(ids[labels != IGNORE])

"""Model and tokenizer loading: the in-code tiny model and local directories."""

import math

import pytest
import torch

from transfer.config.compose import compose_config
from transfer.errors import TransferError
from transfer.models.load import byte_tokenizer, load_model_and_tokenizer

STORY = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park."


def test_byte_tokenizer_round_trips_any_text():
    tok = byte_tokenizer()
    text = 'fn main() { println!("héllo, 世界"); } // Vec<T>'
    ids = tok(text)["input_ids"]
    assert len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text


def test_tiny_model_is_seeded_and_shaped_by_config():
    cfg = compose_config(["model=tiny_random", "model.tiny.num_layers=2", "model.tiny.hidden_size=64"])
    a, tok = load_model_and_tokenizer(cfg.model, 128)
    b, _ = load_model_and_tokenizer(cfg.model, 128)
    assert type(a).__name__ == "Qwen2ForCausalLM" and a.config.num_hidden_layers == 2
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    h, inter, layers, vocab, kv = 64, 384, 2, 320, 64 // 4 * 2
    per_block = (h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * inter + 2 * h  # q, k, v (biases), o, mlp, norms
    assert sum(p.numel() for p in a.parameters()) == vocab * h + layers * per_block + h  # tied head
    assert len(tok) <= a.config.vocab_size


@pytest.mark.parametrize("where", ["tiny", "local"])
def test_without_weights_every_parameter_is_on_the_meta_device(where, request):
    shared = request.getfixturevalue("shared") if where == "local" else None  # skips without ../shared
    overrides = [f"model.name_or_path={shared / 'models' / 'stories260k'}"] if shared else []
    cfg = compose_config(overrides)
    real, _ = load_model_and_tokenizer(cfg.model, 64)
    shapes, _ = load_model_and_tokenizer(cfg.model, 64, weights=False)
    assert {p.device.type for p in shapes.parameters()} == {"meta"}
    assert [(n, p.shape) for n, p in shapes.named_parameters()] == [(n, p.shape) for n, p in real.named_parameters()]
    with pytest.raises(ValueError, match="quantize_4bit needs weights=True"):
        load_model_and_tokenizer(cfg.model, 64, quantize_4bit=True, weights=False)


def _perplexity(model, tokenizer, text):
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    with torch.no_grad():
        return math.exp(model(input_ids=ids, labels=ids).loss.item())


def test_local_directory_with_tokenizer_json(shared):
    path = shared / "models" / "stories260k-qwen2"
    cfg = compose_config([f"model.name_or_path={path}", "model.tokenizer_from_json=true"])
    model, tok = load_model_and_tokenizer(cfg.model, 256)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == 260_672
    llama, llama_tok = load_model_and_tokenizer(
        compose_config([f"model.name_or_path={shared}/models/stories260k"]).model, 256
    )
    assert tok(STORY)["input_ids"] == llama_tok(STORY)["input_ids"]
    # the right tokenizer makes the pretrained model fluent on its own domain
    assert _perplexity(model, tok, STORY) < 3
    assert _perplexity(model, tok, STORY) == pytest.approx(_perplexity(llama, llama_tok, STORY), rel=1e-4)


def test_auto_tokenizer_gets_this_checkpoint_wrong_and_the_loader_says_so(shared):
    """Why model.tokenizer_from_json exists: AutoTokenizer picks Qwen2's class for a SentencePiece vocabulary."""
    from transformers import AutoTokenizer

    path = shared / "models" / "stories260k-qwen2"
    _, right = load_model_and_tokenizer(
        compose_config([f"model.name_or_path={path}", "model.tokenizer_from_json=true"]).model, 256
    )
    wrong = AutoTokenizer.from_pretrained(path)
    assert wrong(STORY)["input_ids"] != right(STORY)["input_ids"]
    with pytest.raises(
        TransferError, match=r"has 513 tokens but the model embeds only 512; .*tokenizer_from_json=true"
    ):
        load_model_and_tokenizer(compose_config([f"model.name_or_path={path}"]).model, 256)


def test_block_size_beyond_the_context_is_refused(shared):
    cfg = compose_config([f"model.name_or_path={shared}/models/stories260k"])
    with pytest.raises(
        TransferError, match=r"block_size=1024 exceeds the context of .*stories260k \(512 tokens\); allowed: 1..512"
    ):
        load_model_and_tokenizer(cfg.model, 1024)


def test_a_directory_without_a_model_is_refused(tmp_path):
    cfg = compose_config([f"model.name_or_path={tmp_path}"])
    with pytest.raises(TransferError, match="cannot read a model config there"):
        load_model_and_tokenizer(cfg.model, 64)

"""Load a causal LM and its tokenizer: the in-code tiny model, a local directory, or a hub name."""

import contextlib
import logging
import sys
import tempfile
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast, Qwen2Config

from transfer.config.model import check_hub_model, hub_reachable
from transfer.errors import TransferError, first_line

log = logging.getLogger(__name__)
EOS = "<|endoftext|>"
# the project's pretrained tiny model (model=tiny), shipped in the package; transfer/tiny/build.py makes them
TINY_WEIGHTS = Path(__file__).resolve().parents[1] / "tiny" / "model.safetensors"
TINY_MANIFEST = TINY_WEIGHTS.with_name("build.json")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_model_and_tokenizer(cfg, block_size: int, quantize_4bit: bool = False, weights: bool = True):
    """Return (model, tokenizer) for `cfg` (the `model` group), refusing a block_size beyond the context.

    quantize_4bit loads the weights in 4-bit NF4 through bitsandbytes (QLoRA; CUDA only).
    weights=False reads the config and the tokenizer but builds the model on the meta device:
    every shape and parameter, no memory and no weights read (nor downloaded).
    """
    if quantize_4bit and not weights:
        raise ValueError("4-bit weights are made by quantizing real weights: quantize_4bit needs weights=True")
    if not sys.stderr.isatty():  # bars on a terminal only: in a log file they are a flood of partial lines
        transformers.utils.logging.disable_progress_bar()
    if cfg.name_or_path is None:
        tokenizer = byte_tokenizer()
        config = tiny_config(cfg.tiny, tokenizer)
        _check_context(config, block_size, "tiny")
        with torch.device("meta") if not weights else contextlib.nullcontext():
            model = build_model(config, seed=cfg.tiny.seed, dtype=DTYPES[cfg.dtype.value])
        if cfg.tiny.pretrained and weights:
            load_tiny_weights(model)
        if quantize_4bit:  # bitsandbytes quantizes while loading: go through a checkpoint
            with tempfile.TemporaryDirectory() as tmp:
                model.save_pretrained(tmp)
                model = AutoModelForCausalLM.from_pretrained(tmp, dtype=DTYPES[cfg.dtype.value], **_quantization())
        return model, tokenizer

    where = cfg.name_or_path
    local = Path(where).expanduser()
    is_local = local.is_dir()
    if not is_local:  # checked at start-up too (config/model.py), once per model: a path, or a hub model not here
        check_hub_model(where, cfg.revision)
    source = str(local) if is_local else where
    kwargs = dict(revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    if not is_local and not hub_reachable():
        kwargs["local_files_only"] = True  # a cached copy still works offline
    try:
        config = AutoConfig.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as e:
        if is_local:
            raise TransferError(
                f"model.name_or_path={where!r}: cannot read a model config there ({first_line(e)})"
            ) from None
        offline = (
            " (the Hugging Face hub is unreachable: offline, and no cached copy)"
            if kwargs.get("local_files_only")
            else ""
        )
        raise TransferError(
            f"model.name_or_path={where!r} is neither a local directory nor a model on the hub{offline}; "
            "allowed: an existing model directory, or a hub name when online (offline: model=tiny)"
        ) from None
    _check_context(config, block_size, where)
    if cfg.tokenizer_from_json:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(source, **kwargs)
    else:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    if not weights:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(
                config, dtype=DTYPES[cfg.dtype.value], trust_remote_code=cfg.trust_remote_code
            )
    else:
        if quantize_4bit:
            kwargs.update(_quantization())
        model = AutoModelForCausalLM.from_pretrained(source, config=config, dtype=DTYPES[cfg.dtype.value], **kwargs)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        raise TransferError(
            f"tokenizer of {where!r} has {len(tokenizer)} tokens but the model embeds only "
            f"{model.get_input_embeddings().num_embeddings}; wrong tokenizer? (try model.tokenizer_from_json=true)"
        )
    return model, tokenizer


def _quantization() -> dict:
    """QLoRA's recipe: NF4 weights, double quantization, bf16 compute, all on the current GPU."""
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    return {"quantization_config": config, "device_map": {"": torch.cuda.current_device()}}


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """256 byte tokens + an end-of-text token; any text round-trips, nothing to download."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab[EOS] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOS])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS)


def load_tiny_weights(model) -> None:
    """The project's pretrained tiny weights (transfer/tiny), into a model of the same shape, in its dtype."""
    from safetensors.torch import load_file

    state = load_file(str(TINY_WEIGHTS))
    own = model.state_dict()
    wrong = [f"{k} {tuple(own[k].shape)} (pretrained: {tuple(v.shape)})" for k, v in state.items()
             if k in own and own[k].shape != v.shape]  # fmt: skip
    if wrong or not state.keys() <= own.keys():
        raise TransferError(
            f"model.tiny's shape differs from the pretrained tiny model's ({wrong[0] if wrong else 'other layers'}); "
            "allowed: the shipped shape (conf/model/tiny.yaml), or model=tiny_random for any shape"
        )
    dtype = next(model.parameters()).dtype
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False)  # the head is tied to them
    model.tie_weights()


def tiny_config(tiny, tokenizer) -> Qwen2Config:
    return Qwen2Config(
        vocab_size=64 * ((len(tokenizer) + 63) // 64),  # padded like real checkpoints
        hidden_size=tiny.hidden_size,
        intermediate_size=tiny.intermediate_size,
        num_hidden_layers=tiny.num_layers,
        num_attention_heads=tiny.num_heads,
        num_key_value_heads=tiny.num_kv_heads,
        max_position_embeddings=tiny.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def build_model(config, seed: int, dtype: torch.dtype = torch.float32):
    """A model with freshly initialised weights, the same for the same seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model


def context_length(config) -> int | None:
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int):
            return value
    return None


def _check_context(config, block_size: int, where: str) -> None:
    limit = context_length(config)
    if limit is not None and block_size > limit:
        raise TransferError(
            f"block_size={block_size} exceeds the context of {where} ({limit} tokens); allowed: 1..{limit}"
        )

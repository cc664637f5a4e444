"""The model group: what model a run loads (a hub name, a folder, or the in-code tiny Qwen2), and what decides
its weights' names and shapes, which a run started from another's weights must share."""

import json
import struct
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from omegaconf import MISSING, DictConfig, OmegaConf

from transfer.config.folders import differences
from transfer.errors import TransferError


class WeightDtype(Enum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


@dataclass
class TinyModelConfig:
    """Shape of the in-code Qwen2 model used offline: pretrained (transfer/tiny) or seeded random weights."""

    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 384
    max_position_embeddings: int = 1024
    # Seeded apart from the run seed, so that every job of a sweep starts
    # from the same weights, as jobs starting from one pretrained model would.
    seed: int = 0
    # The weights pretrained on general English by transfer/tiny/build.py (shipped in the
    # package; the shape above must be theirs), or false: the seeded random initialisation.
    pretrained: bool = False


@dataclass
class ModelConfig:
    name: str = MISSING
    # Hub name or local directory; null builds the in-code model described by `tiny`.
    # Each option's YAML sets it: `???` there (model=local) must stay missing, and a YAML
    # `???` does not override a schema default.
    name_or_path: str | None = MISSING
    revision: str | None = None
    # Load tokenizer.json as a PreTrainedTokenizerFast instead of trusting
    # AutoTokenizer's choice of class (wrong for some converted checkpoints).
    tokenizer_from_json: bool = False
    trust_remote_code: bool = False
    # Dtype of the weights in memory; mixed precision is hardware.precision.
    dtype: WeightDtype = WeightDtype.float32
    tiny: TinyModelConfig | None = None


# options of the group -> the schema class their YAML names (schema/model/<option>)
SCHEMA = {"base": ModelConfig}
# what decides a model's weights' names and shapes; dtype, tokenizer and loading options do not
MODEL_IDENTITY = ("name_or_path", "revision", "tiny")


def model_difference(saved: dict, cfg: DictConfig) -> tuple[str, object, object] | None:
    """(key, theirs, ours) of the first setting by which a run's model differs from this config's, or None."""
    ours = OmegaConf.to_container(cfg.model, resolve=True, enum_to_str=True)
    theirs = saved.get("model") if isinstance(saved.get("model"), dict) else {}
    for key in MODEL_IDENTITY:
        found = differences(theirs.get(key), ours.get(key), f"model.{key}.")
        if found:
            return found[0]
    return None


# ---------------------------------------------------------------- model folders, checked before loading
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


def model_shape(model_cfg, weights: bool) -> tuple[int | None, int | None]:
    """(depth, context) of the model a config names, from its shape or config.json; (None, None) for a hub name.

    A local folder is checked for what loading it needs: a readable config.json, a tokenizer,
    and (unless `weights` is false, as in a dry run) intact weight files.
    """
    if model_cfg.name_or_path is None:
        return model_cfg.tiny.num_layers, model_cfg.tiny.max_position_embeddings
    folder = Path(model_cfg.name_or_path).expanduser()
    if not folder.is_dir():
        return None, None  # a hub name, or not a folder: the loader says which
    where = f"model.name_or_path={model_cfg.name_or_path!r}"
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise TransferError(
            f"{where}: no config.json in {folder}; allowed: a model folder (config.json, weights, tokenizer)"
        )
    try:
        config = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TransferError(f"{where}: {config_file} is unreadable ({e})") from None
    if not isinstance(config, dict):
        raise TransferError(f"{where}: {config_file} holds no model config")
    needed = ("tokenizer.json",) if model_cfg.tokenizer_from_json else TOKENIZER_FILES
    if not any((folder / f).is_file() for f in needed):
        raise TransferError(f"{where}: no tokenizer in {folder}; allowed: {' or '.join(needed)}")
    if weights:
        _check_weights(folder, where)
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    depth = next(
        (text[k] for k in ("num_hidden_layers", "n_layer", "num_layers") if isinstance(text.get(k), int)), None
    )
    context = next(
        (text[k] for k in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
         if isinstance(text.get(k), int)),
        None,
    )  # fmt: skip
    return depth, context


def _check_weights(folder: Path, where: str) -> None:
    present = [f for f in WEIGHT_FILES if (folder / f).is_file()]
    shards = sorted(folder.glob("model-*.safetensors"))
    if not present and not shards:
        raise TransferError(f"{where}: no weights in {folder}; allowed: {', '.join(WEIGHT_FILES)}")
    files = [folder / f for f in present if f.endswith(".safetensors")]
    for index in (f for f in present if f.endswith(".index.json")):
        try:
            names = set(json.loads((folder / index).read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise TransferError(f"{where}: {folder / index} is unreadable ({e})") from None
        for name in sorted(names):
            if not (folder / name).is_file():
                raise TransferError(f"{where}: {folder / index} names {name}, which is missing")
            if name.endswith(".safetensors"):
                files.append(folder / name)
    for file in files:
        problem = safetensors_problem(file)
        if problem:
            raise TransferError(f"{where}: {file} is corrupt ({problem})")


def safetensors_problem(file: Path) -> str | None:
    """What is wrong with a safetensors file's framing, or None: its header and its length, without reading the data."""
    size = file.stat().st_size
    try:
        with open(file, "rb") as fh:
            if size < 8:
                return f"{size} bytes, shorter than a header"
            (length,) = struct.unpack("<Q", fh.read(8))
            if length > size - 8:
                return f"header of {length:,} bytes in a file of {size:,}"
            header = json.loads(fh.read(length))
    except (OSError, ValueError) as e:
        return f"unreadable header: {e}"
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    expected = 8 + length + max(ends, default=0)
    if expected != size:
        return f"truncated: {size:,} bytes where its header says {expected:,}"
    return None

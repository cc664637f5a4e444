"""The model group: what model a run loads (a hub name, a folder, or the in-code tiny Qwen2), and what decides
its weights' names and shapes, which a run started from another's weights must share."""

import functools
import json
import os
import socket
import struct
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from urllib.parse import urlparse

from omegaconf import MISSING, DictConfig, OmegaConf

from transfer.config.folders import differences
from transfer.errors import TransferError, first_line


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
    # How to get a folder that a preset names but the machine may lack (a model built by a make target): said
    # at start-up when the folder is missing.
    build_hint: str | None = None


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
    if not folder.is_dir() and model_cfg.get("build_hint"):
        raise TransferError(f"model.name_or_path={model_cfg.name_or_path!r} does not exist; {model_cfg.build_hint}")
    if not folder.is_dir():
        check_hub_model(model_cfg.name_or_path, model_cfg.revision)
        return None, None  # the loader reads a hub model's shape
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


# ---------------------------------------------------------------- hub models, checked before any job starts
HUB_TIMEOUT = 5.0  # seconds for the hub to answer, once per model of a sweep


def check_hub_model(name: str, revision: str | None) -> None:
    """A name that is no folder: a hub model this machine can load, from the local Hugging Face cache or the hub.

    A path (`/`, `.`, `~`, a file, more than one `/`) is no hub name: its folder does not exist. A hub name is
    looked for in the cache first (no network), then, online, asked of the hub once per model and revision.
    """
    if name.startswith(("/", ".", "~")) or Path(name).expanduser().exists() or name.count("/") > 1:
        what = "is not a directory" if Path(name).expanduser().exists() else "does not exist"
        raise TransferError(
            f"model.name_or_path={name!r} {what}; allowed: a model directory on disk or a hub name like Qwen/Qwen2-0.5B"
        )
    _check_hub_model(name, revision, os.environ.get("HF_HUB_CACHE") or None, hub_offline())


@functools.cache  # once per model of a sweep, not per job
def _check_hub_model(name: str, revision: str | None, cache: str | None, offline: bool) -> None:
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    where = f"model.name_or_path={name!r}" + (f" (revision {revision})" if revision else "")
    try:
        if isinstance(try_to_load_from_cache(name, "config.json", cache_dir=cache, revision=revision), str):
            return  # cached: loads offline too
    except HFValidationError as e:
        raise TransferError(f"{where} is neither a directory nor a hub name ({first_line(e)})") from None
    allowed = f"allowed: a model directory on disk, a hub model in the cache (download it where the hub is reachable: hf download {name}), or model=tiny"
    if offline or not hub_reachable():
        why = "HF_HUB_OFFLINE is set" if offline else f"{_hub_host()} cannot be resolved"
        raise TransferError(
            f"{where} is not in the local Hugging Face cache, and the hub is unreachable ({why}); {allowed}"
        )
    problem = _hub_problem(name, revision)
    if problem:
        raise TransferError(f"{where} is not in the local Hugging Face cache, and {problem}; {allowed}")


def _hub_problem(name: str, revision: str | None) -> str | None:
    """What the hub says of the model's config.json, in HUB_TIMEOUT seconds: None when it is there (or gated:
    the loader says what access needs)."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        get_hf_file_metadata(hf_hub_url(name, "config.json", revision=revision), timeout=HUB_TIMEOUT)
    except GatedRepoError:
        return None
    except RepositoryNotFoundError:
        return "the hub has no such model (or it is private)"
    except RevisionNotFoundError:
        return f"the hub has no revision {revision!r} of it"
    except EntryNotFoundError:
        return "the hub's copy has no config.json"
    except Exception as e:  # a timeout, a refused connection: the jobs would meet it too  # noqa: BLE001
        return f"the hub did not answer in {HUB_TIMEOUT:g} s ({first_line(e)})"
    return None


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or transformers' TRANSFORMERS_OFFLINE) set: no network, the cache only."""
    return any(
        os.environ.get(v, "0") not in ("0", "", "false", "False") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def hub_reachable(timeout: float = 3.0) -> bool:
    """A quick name lookup, so that offline machines fail in seconds, not after the hub client's retries."""
    return not hub_offline() and _resolves(_hub_host(), timeout)


def _hub_host() -> str:
    return urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or "huggingface.co"


@functools.cache  # once a process: a run reads its model's config twice (the memory estimate, then the weights)
def _resolves(host: str, timeout: float) -> bool:
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)
    try:
        socket.getaddrinfo(host, 443)
        return True
    except OSError:
        return False
    finally:
        socket.setdefaulttimeout(previous)

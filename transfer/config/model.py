"""The model group: what model a run loads (a hub name, a folder, or the in-code tiny Qwen2), and what decides
its weights' names and shapes, which a run started from another's weights must share."""

from dataclasses import dataclass
from enum import Enum

from omegaconf import MISSING, DictConfig, OmegaConf

from transfer.config.folders import differences


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

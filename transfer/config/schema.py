"""The structured-config schema: every key, type and allowed value of a run.

Hydra merges each YAML file of `conf/` into these dataclasses, so an unknown key,
a wrong type or an unknown enum value fails while the config is composed, before
anything is loaded. Options of one group that need different keys (LoRA's rank,
SGD's momentum) get their own subclass, stored under `schema/<group>/<option>` and
named in the defaults list of that option's YAML file.

Importing this module registers the schema and the `${corpus:...}` resolver; it
imports neither torch nor transformers, so validation stays fast.
"""

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

CORPORA_DIR = Path(__file__).resolve().parents[1] / "corpora"
GROUPS = ("model", "strategy", "objective", "dataset", "hardware", "optimizer")


class Device(Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Precision(Enum):
    auto = "auto"  # bf16 on a GPU that has it, else fp32
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class OnOutOfMemory(Enum):
    fail = "fail"
    halve = "halve"
    cpu = "cpu"


class MemoryCheck(Enum):
    refuse = "refuse"
    warn = "warn"


class Attention(Enum):
    auto = "auto"  # transformers' choice: sdpa where the model has it, else eager
    sdpa = "sdpa"
    eager = "eager"
    flash_attention_2 = "flash_attention_2"


class Kernels(Enum):
    torch = "torch"  # PyTorch's own operations, and our fused loss (transfer/loss.py)
    liger = "liger"  # Liger's Triton kernels: RMSNorm, SwiGLU, RoPE and fused linear cross-entropy (a CUDA GPU)


class WeightDtype(Enum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class Schedule(Enum):
    cosine = "cosine"
    linear = "linear"
    constant = "constant"


class FinalWeights(Enum):
    best = "best"
    last = "last"


class TxtSampleBy(Enum):
    paragraph = "paragraph"
    line = "line"
    document = "document"


class ExampleFormat(Enum):
    auto = "auto"
    prompt_completion = "prompt_completion"
    alpaca = "alpaca"
    messages = "messages"
    pairs = "pairs"  # prompt, chosen, rejected (preference objectives)
    unpaired = "unpaired"  # prompt, completion, label (KTO)


class Template(Enum):
    auto = "auto"
    chat = "chat"
    plain = "plain"
    none = "none"


class Truncation(Enum):
    truncate = "truncate"
    drop = "drop"


class Batching(Enum):
    padded = "padded"
    packed = "packed"


# ---------------------------------------------------------------- model
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


# ---------------------------------------------------------------- strategy
@dataclass
class StrategyConfig:
    name: str = MISSING
    # AdamW's learning rate for this strategy, used when optimizer.lr is null (each option's YAML
    # says how it was chosen); optimizer.lr set on the command line or in a sweep overrides it.
    lr: float = 3e-4


@dataclass
class FreezeLowerConfig(StrategyConfig):
    # Frozen blocks, counted from the input: an integer count, or a fraction of the depth in (0, 1).
    frozen_blocks: Any = 0.5
    # With tied embeddings the input embedding is the LM head: freezing the
    # embeddings freezes the head too, unless this is true.
    train_tied_embeddings: bool = False


@dataclass
class AdapterConfig(StrategyConfig):
    """Top-block tuning: the top trained_blocks blocks, the final norm and the head train."""

    trained_blocks: int = 2
    train_tied_embeddings: bool = False


# the strategy options that wrap the model in peft adapters
PEFT_STRATEGIES = ("lora", "dora", "qlora", "ia3")


@dataclass
class LoraConfig(StrategyConfig):
    """LoRA, DoRA and QLoRA (the strategy's name picks the variant)."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    # Module names to adapt; null = every linear projection of the blocks.
    target_modules: list[str] | None = None
    use_rslora: bool = False
    # Also train whole modules: "head" and/or "embeddings".
    modules_to_save: list[str] = field(default_factory=list)


@dataclass
class IA3Config(StrategyConfig):
    # null = peft's per-architecture default (attention k/v or q/v, and the MLP down projection).
    target_modules: list[str] | None = None
    feedforward_modules: list[str] | None = None
    modules_to_save: list[str] = field(default_factory=list)


@dataclass
class ScratchConfig(StrategyConfig):
    # Seed of the fresh initialisation; null = the run's seed.
    init_seed: int | None = None


# ---------------------------------------------------------------- objective
@dataclass
class ObjectiveConfig:
    name: str = MISSING
    # The validation metric that picks the best weights and that early stopping watches
    # (its direction is known: loss falls, auc rises); the objective lists what it measures.
    select: str = "loss"


@dataclass
class LMObjectiveConfig(ObjectiveConfig):
    # The token that joins documents into the stream cut into blocks: "eos" (the tokenizer's
    # end-of-text), "none", or a token of the vocabulary such as "<|endoftext|>".
    separator: str = "eos"


@dataclass
class SFTObjectiveConfig(ObjectiveConfig):
    # auto: the tokenizer's chat template, else the plain one; see transfer/data/chat.py
    template: Template = Template.auto
    # false: the loss counts the assistant's answers only
    train_on_prompt: bool = False
    # An example longer than block_size: cut (the prompt's start first, then the answer's end), or dropped.
    truncation: Truncation = Truncation.truncate
    # padded: examples of like length padded to the longest; packed: laid end to end in rows of block_size
    batching: Batching = Batching.padded
    # Validation examples whose answers are generated before and after training.
    samples: int = 3


@dataclass
class PreferenceObjectiveConfig(ObjectiveConfig):
    """DPO, IPO, KTO, CPO, ORPO and SimPO: the option's name picks the row of the loss table
    (transfer/objectives/preference.py); hyper-parameters are named as in the papers."""

    # beta: DPO's and KTO's inverse temperature, IPO's tau, CPO's and SimPO's reward scale
    beta: float = 0.1
    # epsilon of conservative DPO (and CPO, SimPO): the share of labels assumed flipped
    label_smoothing: float = 0.0
    # SimPO's target reward margin gamma
    gamma: float = 0.0
    # ORPO's lambda: the weight of the odds-ratio term next to the answer's likelihood
    lambda_or: float = 0.1
    # CPO's weight of the chosen answer's likelihood (its behaviour-cloning term)
    cpo_alpha: float = 1.0
    # KTO's lambda_D and lambda_U: the weights of desirable and undesirable examples
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    # The reference's log-probabilities computed once before training and cached on disk
    # (keyed by model, data and settings: every job of a sweep reuses them); false: live,
    # from the base with adapters disabled (peft) or a frozen copy (other strategies).
    precompute_reference: bool = False
    reference_cache: str = "${oc.env:TRANSFER_CACHE,'~/.cache/transfer'}/reference"
    template: Template = Template.auto
    truncation: Truncation = Truncation.truncate
    samples: int = 3


# ---------------------------------------------------------------- dataset
@dataclass
class ExampleFields:
    """Rows of examples (objective=sft, an instructions probe): their format and the names of their fields
    (transfer/data/chat.py). ShareGPT's "conversations" is found as well as messages_field."""

    format: ExampleFormat = ExampleFormat.auto
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    instruction_field: str = "instruction"
    input_field: str = "input"
    output_field: str = "output"
    messages_field: str = "messages"


@dataclass
class DatasetConfig(ExampleFields):
    name: str = MISSING
    text_field: str = "text"
    # A split the source lacks is carved out of the training documents.
    holdout_fraction: float = 0.05
    # Fixed apart from the run seed: every job of a sweep sees the same splits.
    split_seed: int = 0
    # Greedy generations from these prompts are recorded before and after training.
    prompts: list[str] = field(default_factory=list)
    # A task's answers, e.g. ["Yes", "No"]: each is scored after the prompt (accuracy, log-loss, AUC).
    choices: list[str] | None = None
    # The field that holds the right choice (null: the answer itself); for KTO's unpaired rows,
    # whether the completion is desirable (null: "label").
    label_field: str | None = None
    chosen_field: str = "chosen"
    rejected_field: str = "rejected"
    # How this data's text is framed: null, as the objective says (objective.template); none,
    # written already as the model should see it (a transcript such as HH-RLHF's).
    template: Template | None = None
    # How to make the files when they are missing (a task's builder), said with the error.
    build_hint: str | None = None
    # What sort of text this is (e.g. "technical documentation"): a forgetting probe of the same genre is
    # flagged, since its fall is transfer, not an absence of forgetting.
    genre: str | None = None
    # Replay against forgetting (objective lm): this fraction of the training rows are blocks of
    # general text; of the first j rows, exactly floor(j * replay). transfer/data/replay.py. 0: none.
    replay: float = 0.0
    # Replay's text: python_docs (the Python documentation's topics that no forgetting probe scores),
    # or a list of .txt/.jsonl/.json/.csv/.parquet files, their text in text_field.
    replay_source: Any = "python_docs"


@dataclass
class TextFilesDataset(DatasetConfig):
    """Local .txt/.jsonl/.json/.csv/.parquet files, read by the `datasets` library."""

    train_files: list[str] = MISSING
    validation_files: list[str] = field(default_factory=list)
    test_files: list[str] = field(default_factory=list)
    txt_sample_by: TxtSampleBy = TxtSampleBy.paragraph


@dataclass
class HubDataset(DatasetConfig):
    """A dataset on the Hugging Face hub."""

    path: str = MISSING
    config_name: str | None = None
    revision: str | None = None
    train_split: str = "train"
    validation_split: str | None = "validation"
    test_split: str | None = "test"


# ---------------------------------------------------------------- evaluation
class ProbeSource(Enum):
    python_docs = "python_docs"
    files = "files"
    hub = "hub"


class ProbeKind(Enum):
    text = "text"
    instructions = "instructions"


@dataclass
class ProbeConfig(ExampleFields):
    """Text scored before and after training: what a strategy made the model forget (eval.probes).

    `text`: raw text, every token scored. `instructions`: instruction examples, framed by the
    model's chat template (or the plain one for a model without), only the answers scored: the
    forgetting that matters for an Instruct model. Rows are read like a dataset's (ExampleFields).
    """

    source: ProbeSource = ProbeSource.python_docs
    kind: ProbeKind = ProbeKind.text
    # What sort of text it is; a probe of the training data's own genre measures transfer, not forgetting,
    # when its perplexity falls (the tables and plots say so when it equals dataset.genre).
    genre: str | None = None
    # Score at most this many tokens (the first ones, so always the same); null = all.
    max_tokens: int | None = 65536
    part: str = "heldout"  # source=python_docs: the topics the tiny model never saw (transfer/data/sources.py)
    files: list[str] = field(default_factory=list)  # source=files
    txt_sample_by: TxtSampleBy = TxtSampleBy.paragraph
    path: str | None = None  # source=hub
    config_name: str | None = None
    revision: str | None = None
    split: str = "test"
    text_field: str = "text"


@dataclass
class EvalConfig:
    # Forgetting probes by name, each scored before and after training: the group eval/probes, a list
    # (eval/probes=[python_docs,wikitext,instructions]); record and tables call each ref_<name>.
    probes: dict[str, ProbeConfig] = field(default_factory=dict)
    # Score only the first N tokens of the validation and test splits (the same ones before,
    # during and after training), for quick checks on big splits; null = every token.
    max_tokens: int | None = None
    # New tokens generated greedily for each of dataset.prompts.
    max_new_tokens: int = 32
    # Weights of the final evaluation: the best by objective.select on the validation split (its loss unless
    # set otherwise), or the last.
    weights: FinalWeights = FinalWeights.best
    # After training, linear CKA between the base and the tuned model at each block's output, on the
    # first cka_blocks validation sequences (record: diagnostics.cka; the weight change is always there).
    cka: bool = False
    cka_blocks: int = 4


@dataclass
class EarlyStoppingConfig:
    # Stop after this many validations without improvement (0: never stop early).
    patience: int = 0
    # An improvement must move objective.select's validation value (the loss unless set otherwise) by more than
    # this, in its better direction (loss falls, auc rises).
    min_delta: float = 0.0


@dataclass
class CheckpointConfig:
    enabled: bool = True
    # Save every N optimizer steps (0: only at the end).
    interval: int = 0
    # Step checkpoints kept on disk (the best weights are kept apart).
    keep: int = 2
    # Non-peft strategies save their trainable weights; true saves the whole model.
    full_model: bool = False


# ---------------------------------------------------------------- hardware
@dataclass
class HardwareConfig:
    name: str = MISSING
    device: Device = Device.auto
    precision: Precision = Precision.fp32
    # CPU threads for torch; null keeps torch's default.
    num_threads: int | None = None
    # Compute the head and the loss over chunks of at most this many tokens, with the
    # head's gradients fused into the loss, so that the full logits never exist at once
    # (0: autograd's path over the whole logits). See transfer/loss.py.
    loss_chunk_tokens: int = 4096
    # Out of GPU memory: fail with one line saying what would fit; halve the micro-batch and
    # double the accumulation (the same batch per step) and retry, down to 1, as evaluation halves
    # eval_batch_size; or go on on the CPU from the last good state.
    on_oom: OnOutOfMemory = OnOutOfMemory.halve
    # Recompute each block's activations in the backward pass instead of keeping them: less memory, more time.
    gradient_checkpointing: bool = False
    # The attention kernel: auto (transformers' choice: sdpa where the model has it, else eager), sdpa,
    # eager, or flash_attention_2 (the flash-attn package; a CUDA GPU in bf16 or fp16).
    attention: Attention = Attention.auto
    # torch.compile each decoder block (regional: the blocks share one compiled graph). The first step and
    # the first evaluation pay for compiling (the record's training.warmup_seconds); samples run uncompiled.
    compile: bool = False
    # torch.compile's mode: default, reduce-overhead (CUDA graphs), max-autotune, max-autotune-no-cudagraphs.
    compile_mode: str = "default"
    # The kernels of the blocks' norms, MLPs and rotary embeddings and of the training loss: torch, or liger
    # (the liger-kernel package, on a CUDA GPU; transfer/transforms.py).
    kernels: Kernels = Kernels.torch
    # GiB a run may use; null: what the device has free when the run starts. An estimated peak
    # above it is one warning line with the settings that would fit (transfer/memory.py).
    memory_limit: float | None = None
    # An estimated peak more than twice the memory (memory_limit, or what is free): refuse the run before its
    # weights are read, in one line with the settings that would fit, unless on_oom can act there (on a GPU:
    # cpu, or halve when batches of one fit); warn: one warning line, and the run tries. A dry run is never refused.
    memory_check: MemoryCheck = MemoryCheck.refuse
    # Estimate the peak on fake tensors before loading the weights (a few seconds for a 0.5B model).
    estimate_memory: bool = True


# ---------------------------------------------------------------- several processes
@dataclass
class DistributedConfig:
    # auto | ddp | fsdp: how torchrun's processes share one job (transfer/distributed.py)
    name: str = MISSING


# ---------------------------------------------------------------- optimizer
@dataclass
class OptimizerConfig:
    name: str = MISSING
    # null: the strategy's strategy.lr (see learning_rate); a number: this rate, whatever the strategy
    lr: float | None = None
    weight_decay: float = 0.0
    # Warm-up as a number of optimizer steps, or as a fraction of them; not both.
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    schedule: Schedule = Schedule.cosine
    # Cosine decays to lr * min_lr_ratio.
    min_lr_ratio: float = 0.0
    # Max global gradient norm; null disables clipping (the norm is still logged).
    grad_clip: float | None = 1.0


def learning_rate(cfg) -> tuple[float, str]:
    """The rate a run's optimizer starts from, and where it comes from: "optimizer.lr" or "strategy".

    Takes a config or its plain-dict form (a record's, a checkpoint's); one written before strategies
    had rates of their own holds optimizer.lr, and gets it.
    """
    lr = cfg["optimizer"].get("lr")
    return (lr, "optimizer.lr") if lr is not None else (cfg["strategy"]["lr"], "strategy")


@dataclass
class AdamWConfig(OptimizerConfig):
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    # torch's fused kernel (CUDA and CPU): one pass over all tensors per step, not one per tensor.
    fused: bool = True


@dataclass
class SGDConfig(OptimizerConfig):
    momentum: float = 0.9
    nesterov: bool = False


# ---------------------------------------------------------------- search
@dataclass
class SearchConfig:
    """The Optuna trial a job is (hydra/sweeper=optuna sets all three for each job; null outside a search).

    The job reports its validation metric to the trial at every eval_interval and stops when
    the study's pruner says so (transfer/search.py).
    """

    trial: int | None = None  # the trial's number in the study
    study: str | None = None
    storage: str | None = None  # the study's database URL, e.g. sqlite:///<sweep>/optuna.db


# ---------------------------------------------------------------- cache
@dataclass
class CacheConfig:
    """A sweep's shared work: tokens and the untrained model's scores, done once (transfer/cache.py)."""

    enabled: bool = True
    dir: str | None = None  # null: <sweep>/.cache in a sweep, nothing for a single run


# ---------------------------------------------------------------- logging
class Logger(Enum):  # transfer.training.loggers.LOGGERS: the class of each
    tensorboard = "tensorboard"


@dataclass
class LoggingConfig:
    # Where curves and summaries go, rank 0 only: several at once, or [] for none (metrics.json is always written).
    loggers: list[Logger] = field(default_factory=lambda: [Logger.tensorboard])


# ---------------------------------------------------------------- the run
@dataclass
class Config:
    model: ModelConfig = MISSING
    strategy: StrategyConfig = MISSING
    objective: ObjectiveConfig = MISSING
    dataset: DatasetConfig = MISSING
    hardware: HardwareConfig = MISSING
    optimizer: OptimizerConfig = MISSING
    distributed: DistributedConfig = MISSING

    seed: int = 1234
    # Training length: optimizer steps, epochs over the training blocks, or both
    # (whichever ends first).
    max_steps: int | None = 200
    epochs: float | None = None
    micro_batch_size: int = 8
    grad_accum_steps: int = 1
    block_size: int = 128
    # Validate every N optimizer steps (0: only before and after training).
    eval_interval: int = 50
    eval_batch_size: int = 16
    # Log the training loss to TensorBoard every N optimizer steps.
    log_interval: int = 10
    # Build the model on the meta device (shapes, no weights), apply the strategy,
    # write the record with the counts, stop.
    dry_run: bool = False

    eval: EvalConfig = field(default_factory=EvalConfig)
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    # Start from another run's final weights (its best or last, as it evaluated): a folder of a
    # completed run of the same model; a LoRA parent's adapter is merged into the base first.
    init_from: str | None = None
    # Continue a killed run: true = from the last checkpoint in the run's own folder
    # (a completed run is skipped), or the path of a run folder or checkpoint.
    resume: Any = False
    # After a sweep, write its comparison tables and plots into <sweep>/tables/.
    tables_after_sweep: bool = True
    search: SearchConfig = field(default_factory=SearchConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


def register() -> None:
    cs = ConfigStore.instance()
    cs.store(name="schema", node=Config)
    for group, option, node in [
        ("model", "base", ModelConfig),
        ("strategy", "base", StrategyConfig),
        ("strategy", "freeze_lower", FreezeLowerConfig),
        ("strategy", "adapter", AdapterConfig),
        ("strategy", "lora", LoraConfig),
        ("strategy", "ia3", IA3Config),
        ("strategy", "scratch", ScratchConfig),
        ("objective", "lm", LMObjectiveConfig),
        ("objective", "sft", SFTObjectiveConfig),
        ("objective", "preference", PreferenceObjectiveConfig),
        ("dataset", "text_files", TextFilesDataset),
        ("dataset", "hub", HubDataset),
        ("hardware", "base", HardwareConfig),
        ("distributed", "base", DistributedConfig),
        ("optimizer", "adamw", AdamWConfig),
        ("optimizer", "sgd", SGDConfig),
    ]:
        cs.store(group=f"schema/{group}", name=option, node=node)
    if not OmegaConf.has_resolver("corpus"):
        # ${corpus:rust_concepts/train.jsonl} -> a file shipped inside the package
        OmegaConf.register_new_resolver("corpus", lambda rel: str(CORPORA_DIR / rel))


register()

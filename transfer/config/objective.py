"""The objective group: its config classes, its checks, and what each objective is, in one table.

Torch-free, like the whole of config/. A new objective is a row of OBJECTIVES, its module in objectives/
and its YAML in conf/objective/; the checks, the memory estimate, the speed options and the tables read
the row instead of the objective's name.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from omegaconf import MISSING, DictConfig

from transfer.errors import TransferError

# Which way each metric improves: picking the best weights, early stopping, sorting tables and plots (acc, acc_norm:
# a benchmark's, evaluation/benchmarks.py).
DIRECTION = {"loss": "min", "perplexity": "min", "accuracy": "max", "auc": "max", "log_loss": "min",
             "reward_accuracy": "max", "margin": "max", "acc": "max", "acc_norm": "max"}  # fmt: skip
# What a task's record holds beside its metrics and that has no better direction: what a constant answer scores
# (each choice's, and the majority class's; the gold shares) and how the model's answers spread over the choices
# (evaluation/choices.py). Kept out of eval.change and never selected: a model that answers one choice always is no
# better or worse for it, it is seen by it.
# A benchmark's standard errors (evaluation/benchmarks.py) describe its accuracies: no change of theirs is a result.
DESCRIPTIVE = ("constant_accuracy", "majority_accuracy", "predicted_share", "max_predicted_share", "acc_stderr",
               "acc_norm_stderr")  # fmt: skip

# instruction tuning's example formats (data/chat.py), and a preference objective's
EXAMPLE_FORMATS = ("prompt_completion", "alpaca", "messages")
PREFERENCE_FORMATS = ("pairs", "unpaired")


def choice_metric_names(choices) -> tuple[str, ...]:
    """What scoring a task's choices measures (evaluation/choices.py): AUC only where there are two."""
    if not choices:
        return ()
    return ("accuracy", "log_loss", "auc") if len(choices) == 2 else ("accuracy", "log_loss")


@dataclass(frozen=True)
class ObjectiveSpec:
    family: str  # "lm" (blocks of text), "sft" (examples with answers) or "preference" (chosen and rejected)
    runs_as: str  # its class in objectives/, "module:Class" (objectives.build_objective imports it)
    formats: tuple[str, ...]  # dataset.format values besides "auto"
    reference: bool = False  # a frozen copy of the initial model scores every step
    unpaired: bool = False  # rows of one answer and a label are allowed (KTO)
    kl_estimate: bool = False  # the loss estimates a KL term from other answers of the step (KTO): it needs two
    rows_per_example: int = 1  # sequences a micro-batch holds per example: a pair is two
    token_loss: bool = True  # the loss is cross-entropy over the head's logits (a fused head loss applies)
    replay: bool = False  # dataset.replay_fraction may mix general text into its training stream

    @property
    def preference(self) -> bool:
        return self.family == "preference"

    def selectable(self, dataset: DictConfig) -> list[str]:
        """The metrics objective.select may name, on this dataset."""
        if self.preference:
            return ["loss"] if dataset.format.value == "unpaired" else ["loss", "reward_accuracy", "margin"]
        allowed = ["loss", "perplexity"]
        if self.family == "sft":
            allowed += choice_metric_names(dataset.choices)
        return allowed

    def fields(self, dataset: DictConfig, unpaired: bool | None = None) -> list[tuple[str, ...]]:
        """The fields a row must have, as alternatives (config.preflight.check_data_files).

        `unpaired=False` asks for a preference objective's pairs alone, whatever the objective allows."""
        d = dataset
        if self.preference:
            pairs = [(d.prompt_field, d.chosen_field, d.rejected_field)]
            unpaired = self.unpaired if unpaired is None else unpaired
            return pairs + ([(d.prompt_field, d.completion_field, d.label_field or "label")] if unpaired else [])
        if self.family == "sft":
            formats = {
                "prompt_completion": [(d.prompt_field, d.completion_field)],
                "alpaca": [(d.instruction_field, d.output_field)],
                "messages": [(d.messages_field,), ("conversations",)],
            }
            chosen = d.format.value
            return [alt for name, alts in formats.items() if chosen in ("auto", name) for alt in alts]
        return [(d.text_field,)]


def _preference(reference: bool, unpaired: bool = False) -> ObjectiveSpec:
    return ObjectiveSpec("preference", "transfer.objectives.preference:PreferenceOptimisation", PREFERENCE_FORMATS,
                         reference=reference, unpaired=unpaired, kl_estimate=unpaired, rows_per_example=2,
                         token_loss=False)  # fmt: skip


OBJECTIVES = {
    # lm reads text_field whatever dataset.format says; the example formats pass its check, as they always have
    "lm": ObjectiveSpec("lm", "transfer.objectives.lm:LanguageModelling", EXAMPLE_FORMATS, replay=True),
    "sft": ObjectiveSpec("sft", "transfer.objectives.sft:InstructionTuning", EXAMPLE_FORMATS),
    "dpo": _preference(reference=True),
    "ipo": _preference(reference=True),
    "kto": _preference(reference=True, unpaired=True),
    "cpo": _preference(reference=False),
    "orpo": _preference(reference=False),
    "simpo": _preference(reference=False),
}


def spec(name: str) -> ObjectiveSpec:
    return OBJECTIVES[name]


# ---------------------------------------------------------------- the config classes
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


# options of the group -> the schema class their YAML names (schema/objective/<option>)
SCHEMA = {"lm": LMObjectiveConfig, "sft": SFTObjectiveConfig, "preference": PreferenceObjectiveConfig}


# ---------------------------------------------------------------- the checks
def check_objective(cfg: DictConfig) -> None:
    """The objective's values against its dataset: the format, the select metric, the answers a step holds."""
    objective, dataset = cfg.objective, cfg.dataset
    row = spec(objective.name)
    formats = ("auto", *row.formats)
    if dataset.format.value not in formats:
        raise TransferError(
            f"dataset.format={dataset.format.value} is not for objective={objective.name}; allowed: {', '.join(formats)}"
        )
    if row.preference:
        check_preference(objective)
    if row.kl_estimate and cfg.micro_batch_size * cfg.grad_accum_steps == 1:
        raise TransferError(
            f"objective={objective.name} with micro_batch_size x grad_accum_steps = 1: its KL estimate pairs each "
            "prompt with another answer of the step, and with one answer a step it is that answer's own reward; "
            "allowed: 2 or more answers a step, e.g. grad_accum_steps=2"
        )
    allowed = row.selectable(dataset)
    if objective.select not in allowed:
        choices_hint = "; accuracy, auc and log_loss need dataset.choices" if row.family == "sft" else ""
        raise TransferError(f"objective.select={objective.select!r}: allowed {', '.join(allowed)}{choices_hint}")
    if dataset.choices is not None:
        stripped = [c.strip() for c in dataset.choices]
        if len(stripped) < 2 or len(set(stripped)) != len(stripped) or not all(stripped):
            raise TransferError(f"dataset.choices={list(dataset.choices)}: allowed two or more different answers")
    if objective.get("samples") is not None and objective.samples < 0:
        raise TransferError(f"objective.samples={objective.samples} must be 0 or more")


def check_preference(o: DictConfig) -> None:
    if o.beta <= 0:
        raise TransferError(f"objective.beta={o.beta} must be positive")
    if not 0 <= o.label_smoothing < 0.5:
        raise TransferError(
            f"objective.label_smoothing={o.label_smoothing}: allowed [0, 0.5) (the share of flipped labels)"
        )
    for key in ("gamma", "lambda_or", "cpo_alpha"):
        if o[key] < 0:
            raise TransferError(f"objective.{key}={o[key]} must be 0 or more")
    if o.desirable_weight <= 0 or o.undesirable_weight <= 0:
        raise TransferError(
            f"objective.desirable_weight={o.desirable_weight}, undesirable_weight={o.undesirable_weight}: both must be positive"
        )
    if o.precompute_reference and not spec(o.name).reference:
        raise TransferError(f"objective.precompute_reference=true: {o.name} uses no reference model; allowed false")

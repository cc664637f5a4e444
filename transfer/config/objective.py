"""What each objective is, in one table: the facts every other module asks for instead of its name.

Torch-free, like the whole of config/. A new objective is a row here, its module in objectives/ and
its YAML in conf/objective/; the checks, the memory estimate, the speed options and the tables read the row.
"""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import DictConfig

# Which way each metric improves: picking the best weights, early stopping, sorting tables and plots.
DIRECTION = {"loss": "min", "perplexity": "min", "accuracy": "max", "auc": "max", "log_loss": "min",
             "reward_accuracy": "max", "margin": "max"}  # fmt: skip

# instruction tuning's example formats (data/chat.py), and a preference objective's
EXAMPLE_FORMATS = ("prompt_completion", "alpaca", "messages")
PREFERENCE_FORMATS = ("pairs", "unpaired")


@dataclass(frozen=True)
class ObjectiveSpec:
    family: str  # "lm" (blocks of text), "sft" (examples with answers) or "preference" (chosen and rejected)
    runs_as: str  # its class in objectives/, "module:Class" (objectives.build_objective imports it)
    formats: tuple[str, ...]  # dataset.format values besides "auto"
    reference: bool = False  # a frozen copy of the initial model scores every step
    unpaired: bool = False  # rows of one answer and a label are allowed (KTO)
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
        if self.family == "sft" and dataset.choices:
            allowed += ["accuracy", "log_loss"] + (["auc"] if len(dataset.choices) == 2 else [])
        return allowed

    def fields(self, dataset: DictConfig) -> list[tuple[str, ...]]:
        """The fields a row must have, as alternatives (config.preflight.check_data_files)."""
        d = dataset
        if self.preference:
            pairs = [(d.prompt_field, d.chosen_field, d.rejected_field)]
            return pairs + ([(d.prompt_field, d.completion_field, d.label_field or "label")] if self.unpaired else [])
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
                         reference=reference, unpaired=unpaired, rows_per_example=2, token_loss=False)  # fmt: skip


OBJECTIVES = {
    "lm": ObjectiveSpec("lm", "transfer.objectives.lm:LanguageModelling", (), replay=True),
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

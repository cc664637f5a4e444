"""Objectives: what a run learns and how it is judged (base.py says what each provides).

Adding one is a module here, a row in OBJECTIVES, a YAML file in conf/objective/ and its
schema class in schema.py; the loop, evaluation, checkpoints, records and tables are shared.
"""

from transfer.objectives.lm import LanguageModelling
from transfer.objectives.preference import PAIR_LOSSES, PreferenceOptimisation
from transfer.objectives.sft import InstructionTuning

OBJECTIVES = {"lm": LanguageModelling, "sft": InstructionTuning, "kto": PreferenceOptimisation,
              **dict.fromkeys(PAIR_LOSSES, PreferenceOptimisation)}  # fmt: skip


def build_objective(cfg, tokenizer):
    """The objective a run's config names, for this tokenizer."""
    return OBJECTIVES[cfg.objective.name](cfg.objective, cfg.dataset, tokenizer, cfg.block_size)

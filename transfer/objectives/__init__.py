"""Objectives: what a run learns and how it is judged (base.py says what each provides).

Adding one is a module here, its row in config/objective.py OBJECTIVES (whose `runs_as` names its
class here) and a YAML file in conf/objective/; the loop, evaluation, checkpoints, records and
tables are shared.
"""

import importlib

from transfer.config.objective import spec
from transfer.objectives.base import Objective


def objective_class(name: str) -> type:
    """The class that objective=`name` runs as (its spec's `runs_as`)."""
    module, _, cls = spec(name).runs_as.partition(":")
    return getattr(importlib.import_module(module), cls)


def build_objective(cfg, tokenizer) -> Objective:
    """The objective a run's config names, for this tokenizer."""
    return objective_class(cfg.objective.name)(cfg.objective, cfg.dataset, tokenizer, cfg.block_size)

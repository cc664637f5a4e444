"""The Optuna search at run time, on the sweeper's side: the sampler, and each finished job's outcome.

The sweeper (`hydra/sweeper=optuna`, hydra_plugins/transfer_optuna_sweeper) asks the study for trials and
launches them as jobs through Hydra's launcher; each job reports its validation metric to its trial
(transfer.training.pruning); after each batch the sweeper reads the jobs' records and tells the study
(`outcome`). The search space, the settings' checks and the study's storage are torch-free start-up work:
transfer.config.search.

Optuna is an optional install (`pip install -e ".[search]"`) and is imported only where a search runs.
"""

import math

from transfer.config.search import Param
from transfer.record import lookup

SUMMARY_NAME = "optuna_best.yaml"


def stored_space(space: dict[str, Param]) -> dict:
    """The search space as the study keeps it (SPACE): what the user wrote, and Optuna's own form to compare."""
    from optuna.distributions import distribution_to_json

    return {key: {"text": p.text, "distribution": distribution_to_json(p.distribution())} for key, p in space.items()}


def make_sampler(name: str, seed: int | None, startup_trials: int):
    import optuna

    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup_trials)


def metric_value(record: dict, path: str) -> float | None:
    node = lookup(record, path)
    if isinstance(node, bool) or not isinstance(node, (int, float)) or not math.isfinite(node):
        return None
    return float(node)


def outcome(record: dict | None, metric: str) -> tuple[str, float | None, str | None]:
    """(COMPLETE, PRUNED or FAIL, the value, why it failed) of a finished job, from its record."""
    if record is None:
        return "FAIL", None, "no record (metrics.json)"
    status = record.get("status")
    if status == "pruned":
        return "PRUNED", None, None
    if status != "completed":
        return "FAIL", None, record.get("error") or f"status {status}"
    value = metric_value(record, metric)
    if value is None:
        return "FAIL", None, _no_metric(record, metric)
    return "COMPLETE", value, None


def _no_metric(record: dict, metric: str) -> str:
    """Why a completed record gives no value of the metric: not there (and what is there instead), or no number."""
    node = lookup(record, metric, missing=_ABSENT)
    if node is not _ABSENT:
        return f"{metric} is {node!r} in its record, not a number"
    parent = metric.rsplit(".", 1)[0]
    there = lookup(record, parent)
    held = f"; its {parent} holds {', '.join(there)}" if isinstance(there, dict) and there else ""
    return f"its record has no {metric}{held}"


_ABSENT = object()

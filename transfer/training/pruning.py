"""A trial's side of an Optuna search, in the training loop: report the validation metric, stop when pruned.

The job learns its trial from `search.trial`, `search.study` and `search.storage` (the sweeper sets all
three, transfer.sweep.search); the study's own settings name the pruner (transfer.config.search.STUDY_SETTINGS).
"""

import logging
import math
import warnings
from collections.abc import Mapping

from transfer.config.search import INSTALL, STUDY_SETTINGS, open_storage
from transfer.errors import TransferError

log = logging.getLogger(__name__)


def make_pruner(settings: Mapping):
    import optuna

    name = settings.get("pruner", "none")
    if name == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=settings["pruner_startup_trials"], n_warmup_steps=settings["pruner_warmup_steps"]
        )
    if name == "asha":
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=settings.get("min_resource") or "auto", reduction_factor=settings["reduction_factor"]
        )
    return optuna.pruners.NopPruner()


# ---------------------------------------------------------------- in the job
class Pruning:
    """A trial's side of pruning: report the validation metric at each validation, learn whether to stop.

    Outside a search (search.trial is null) it reports nothing and never stops a run.
    """

    def __init__(self, trial=None, metric: str | None = None, number: int | None = None):
        self.trial, self.metric, self.number = trial, metric, number

    @classmethod
    def from_config(cls, cfg) -> "Pruning":
        from transfer.training import distributed

        search = cfg.get("search")
        if search is None or search.trial is None or not distributed.is_main():  # one process reports a trial
            return cls()
        if search.storage is None or search.study is None:
            raise TransferError(
                f"search.trial={search.trial} needs search.storage and search.study (the sweeper sets all three)"
            )
        try:
            import optuna
        except ImportError:
            raise TransferError(
                f"search.trial={search.trial}: this job reports to an Optuna study, and Optuna is not installed here: {INSTALL}"
            ) from None
        storage = open_storage(search.storage)
        try:
            study_id = storage.get_study_id_from_name(search.study)
            trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, search.trial)
        except KeyError:
            raise TransferError(
                f"search.trial={search.trial}: no such trial in study {search.study!r} of {search.storage}"
            ) from None
        state = storage.get_trial(trial_id).state
        if state != optuna.trial.TrialState.RUNNING:  # the study would refuse its reports mid-training
            raise TransferError(
                f"search.trial={search.trial} of study {search.study!r} is {state.name.lower()}; "
                "allowed: a running trial, as the sweeper hands out"
            )
        settings = storage.get_study_user_attrs(study_id).get(STUDY_SETTINGS, {})
        study = optuna.load_study(study_name=search.study, storage=storage, pruner=make_pruner(settings))
        metric = settings.get("report") or cfg.objective.select
        log.info("trial %d of study %r: reports validation %s, pruner %s", search.trial, search.study, metric,
                 settings.get("pruner", "none"))  # fmt: skip
        return cls(optuna.trial.Trial(study, trial_id), metric, search.trial)

    @property
    def active(self) -> bool:
        return self.trial is not None

    def report(self, step: int, result: dict) -> bool:
        """Report this validation's result at `step`; True when the trial should stop (pruned)."""
        if self.trial is None:
            return False
        value = result.get(self.metric)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            log.warning("trial %d: validation gave no %s to report; it is not pruned", self.number, self.metric)
            return False
        with warnings.catch_warnings():  # a resumed run reports its steps again; Optuna keeps the first
            warnings.simplefilter("ignore")
            self.trial.report(float(value), step)
        prune = bool(self.trial.should_prune())  # numpy.bool_ from some pruners
        if prune:
            log.info("trial %d pruned at step %d: validation %s %.4g", self.number, step, self.metric, value)
        return prune

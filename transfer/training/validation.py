"""The validation split judged during training: every `eval_interval` steps and at the last one.

The best value of the objective's `select` metric marks the best weights (the untrained model counts, as step 0),
kept in memory and, when checkpoints are on, in `checkpoints/best/`; early stopping watches it; in an Optuna
search the trial's pruner judges each validation against the other trials'. The final evaluation uses the best or
the last weights, as `eval.weights` says.
"""

import json
import logging
from pathlib import Path

from transfer.config.folders import resumable_config
from transfer.config.objective import OBJECTIVES
from transfer.errors import TransferError
from transfer.fmt import describe_metrics
from transfer.training import checkpoint, distributed
from transfer.training.loggers import scalars_of
from transfer.training.progress import Progress
from transfer.training.pruning import Pruning

log = logging.getLogger(__name__)


class Validation:
    """`run(step)` judges the validation split and says whether training stops there (early_stop, pruned)."""

    def __init__(self, model, objective, splits, cfg, hardware, trainee, plan, logger, best: Path | None,
                 baseline: dict | None):  # fmt: skip
        """`best`: where the best weights are saved (None: in memory only); `baseline`: the untrained model's
        validation result."""
        self.model, self.objective, self.split = model, objective, splits.get("validation")  # read when due
        self.cfg, self.hardware, self.trainee, self.plan = cfg, hardware, trainee, plan
        self.logger, self.best, self.baseline = logger, best, baseline
        self.every = cfg.eval_interval
        self.pruning = Pruning.from_config(cfg)  # in an Optuna search, this run's trial; else inert
        if baseline and objective.select not in baseline:  # KTO's pair metrics on unpaired rows from the hub
            measured = ", ".join(m for m in objective.metrics if m in baseline)
            why = " (its rows are unpaired: no pair to compare)" if OBJECTIVES[objective.name].unpaired else ""
            raise TransferError(
                f"objective.select={objective.select}: the validation split gives no {objective.select}{why}; "
                f"allowed with this data: {measured}"
            )
        self.best_weights = checkpoint.trainable_state(model) if self.every else None

    def start(self) -> Progress:
        """A new run's progress: the untrained weights are the best until validation says otherwise."""
        best = self.baseline[self.objective.select] if self.baseline else self.objective.worst()
        return Progress(best_value=best, best_step=0 if self.every else None)

    def due(self, step: int, last_step: int) -> bool:
        return bool(self.every) and (step % self.every == 0 or step == last_step)

    def run(self, step: int, progress: Progress) -> str | None:
        """Validate at `step`: the curve, the best weights, and why training stops here (None: it goes on)."""
        objective, cfg = self.objective, self.cfg
        result = self.plan.evaluate(
            lambda size: self.trainee.use(objective.evaluate, self.split, size, self.hardware, "validate"),
            f"validation at step {step}",
        )
        self.model.train()
        progress.validation_curve.append({"step": step, **result})
        log.info("step %d: validation %s", step, describe_metrics(result))
        self.logger.scalars(scalars_of("validation", result), step)
        value = result.get(objective.select)
        if value is not None and objective.better(value, progress.best_value, cfg.early_stopping.min_delta):
            progress.best_value, progress.best_step, progress.evals_since_best = value, step, 0
            self.best_weights = checkpoint.trainable_state(self.model)
            if self.best is not None:  # whose they are: restore.check_own
                checkpoint.save(self.best, self.model, cfg.checkpoint.full_model,
                                meta={"step": step, objective.select: value}, config=resumable_config(cfg))  # fmt: skip
        else:
            progress.evals_since_best += 1
        stop = None
        if cfg.early_stopping.patience and progress.evals_since_best >= cfg.early_stopping.patience:
            stop = "early_stop"
            log.info("early stop at step %d: %d validations without improvement since step %d",
                     step, progress.evals_since_best, progress.best_step)  # fmt: skip
        # an Optuna search's pruner judges this trial against the others: rank 0 reports, every rank stops
        if distributed.any_rank(self.pruning.report(step, result), self.hardware.device):
            stop = "pruned"
        return stop

    def resume(self, folder: Path, progress: Progress) -> None:
        """The best weights of a resumed run, from `folder` (checkpoints/best) where it still holds that step."""
        if not progress.best_step:  # step 0 is the untrained model: best_weights holds it already
            return
        saved = json.loads((folder / "best.json").read_text())["step"] if (folder / "best.json").is_file() else None
        problem = distributed.from_rank_zero(lambda: checkpoint.damage(folder)) if saved == progress.best_step else None
        if problem:
            log.warning("best weights of step %s are damaged (%s): the final evaluation cannot use them",
                        saved, problem)  # fmt: skip
            self.best_weights = None
        elif saved == progress.best_step:
            current = checkpoint.trainable_state(self.model)
            checkpoint.load_weights(folder, self.model)
            self.best_weights = checkpoint.trainable_state(self.model)
            checkpoint.restore_trainable(self.model, current)
        else:  # best/ was overwritten after this checkpoint; the same training finds that step again
            log.warning("best weights of step %s are not on disk (best/ holds step %s)", progress.best_step, saved)
            self.best_weights = None

    def final_weights(self, progress: Progress) -> dict:
        """Put the best weights back where eval.weights=best asks for them; which weights the final evaluation
        uses, and of which step."""
        which, step = self.cfg.eval.weights.value, progress.step
        if which == "best" and self.best_weights is not None and progress.best_step != step:
            checkpoint.restore_trainable(self.model, self.best_weights)
            step = progress.best_step
            log.info("final evaluation on the best weights, from step %d", step)
        return {"which": which if self.best_weights is not None else "last", "step": step}

"""The training loop, in plain PyTorch: read it top to bottom. The objective is a component.

One optimizer step = `grad_accum_steps` micro-batches that the objective draws from its
seeded, restartable stream of training examples (`micro_batch_size` examples each, or
rows of packed examples). The objective gives each micro-batch's loss as a sum and a
normaliser (the targets it scores); each sum is divided by the normalisers of the whole
step, so the update is the same however the step is split, and however many tokens a
mask leaves in each piece (transfer.training.step).

Every `eval_interval` steps and at the last step the validation split is judged
(transfer.training.validation): best weights, early stopping, pruning. Time spent
validating or checkpointing is not training time.

Ctrl-C or SIGTERM stops the loop between two steps, where weights, optimizer, RNG and
data position agree: it saves a checkpoint there and raises Interrupted, so that
resume=true continues exactly. A second Ctrl-C stops at once.
"""

import logging
from dataclasses import asdict
from pathlib import Path

from transfer.config.folders import resumable_config
from transfer.errors import Interrupted, TransferError
from transfer.training import checkpoint, distributed
from transfer.training.loggers import Loggers
from transfer.training.oom import MemoryPlan, optimizer_mover
from transfer.training.progress import Clock, Progress, Report, StopRequests, plan_steps, result
from transfer.training.step import Update
from transfer.training.validation import Validation

log = logging.getLogger(__name__)


def train(model, objective, splits, cfg, hardware, logger=None, run_dir: Path | None = None,
          resume_from: Path | None = None, baseline: dict | None = None, plan: MemoryPlan | None = None,
          trainee: distributed.Trainee | None = None) -> dict:  # fmt: skip
    """Train `model` on `objective`'s training split; `baseline` is the untrained model's validation result.

    `logger`: where curves go (transfer.training.loggers; none by default). `plan` holds the batch sizes in use and
    what to do when memory runs out (transfer.training.oom); `trainee`, the model as several processes share it
    (transfer.training.distributed), made before the optimizer sees its parameters.
    """
    trainee = trainee or distributed.Trainee(model, hardware.device)
    logger = logger or Loggers()
    examples = splits["train"]
    plan = plan or MemoryPlan(cfg, hardware)
    per_step = cfg.micro_batch_size * cfg.grad_accum_steps  # halving keeps it
    total_steps, bound = plan_steps(cfg, objective.steps_per_epoch(examples, per_step))
    saves = Checkpoints(cfg, run_dir)  # every rank takes part in a checkpoint (checkpoint.save)
    best = saves.folder / "best" if saves.folder else None
    validation = Validation(model, objective, splits, cfg, hardware, trainee, plan, logger, best, baseline)
    update = Update(model, cfg, hardware, total_steps)
    progress = validation.start()
    if resume_from is not None:
        progress = _resume(resume_from, model, update, validation)
        saves.last = progress.step
        if progress.micro_batch_size:  # halved before the interruption: go on at the sizes that fitted
            plan.micro, plan.accum = progress.micro_batch_size, progress.grad_accum_steps
    plan.movers = [model.to, optimizer_mover(update.optimizer), objective.to]
    stream = objective.stream(examples, cfg.seed, progress.samples, per_step)
    first_step = total_steps + 1 if progress.stop_reason else progress.step + 1  # an early stop stays stopped

    model.train()
    clock = Clock(progress, hardware)
    report = Report(progress, clock, total_steps, cfg.log_interval, logger)
    stop = StopRequests()
    with report, stop.installed():
        for step in range(first_step, total_steps + 1):
            # between two steps: the state on disk is the state of a step's end (in several processes, the same step)
            if stop.asked(hardware.device):
                clock.pause()
                saves.save_unless_saved(model, update, progress)
                log.info("stopped after step %d by %s; checkpoint %s", progress.step, stop.signal,
                         "saved" if saves.folder else "off (checkpoint.enabled=false): a resume starts over")  # fmt: skip
                raise Interrupted(stop.signal)
            done = update.step(step, trainee, objective, examples, stream, plan)
            progress.add(step, done, stream.position, plan)
            report.step(step, done)

            validating, saving_now = validation.due(step, total_steps), saves.due(step)
            if not (validating or saving_now):
                continue
            clock.pause()
            if validating:
                progress.stop_reason = validation.run(step, progress)
            if saving_now:
                saves.save(model, update, progress)
            clock.go_on()
            if progress.stop_reason:
                break
    clock.pause()
    report.close()
    progress.stop_reason = progress.stop_reason or bound
    saves.save_unless_saved(model, update, progress)
    final_weights = validation.final_weights(progress)
    epochs = objective.epochs(progress.samples, examples)
    return result(progress, total_steps, epochs, report.machine, objective.select, final_weights, saves.record())


class Checkpoints:
    """This run's step checkpoints (none without a run folder, or with checkpoint.enabled=false)."""

    def __init__(self, cfg, run_dir: Path | None):
        self.cfg = cfg
        self.folder = run_dir / "checkpoints" if cfg.checkpoint.enabled and run_dir is not None else None
        self.last, self.bytes = None, None  # the step saved last: the same on every rank, unlike what each sees on disk

    def due(self, step: int) -> bool:
        return bool(self.folder and self.cfg.checkpoint.interval and step % self.cfg.checkpoint.interval == 0)

    def save(self, model, update, progress: Progress) -> None:
        state = {**update.state(), "rng": checkpoint.rng_state(), "progress": asdict(progress)}
        self.bytes = checkpoint.save(self.folder / f"step-{progress.step:06d}", model, self.cfg.checkpoint.full_model,
                                     update.optimizer, state, config=resumable_config(self.cfg))  # fmt: skip
        if distributed.is_main():
            checkpoint.prune(self.folder, self.cfg.checkpoint.keep)
        self.last = progress.step

    def save_unless_saved(self, model, update, progress: Progress) -> None:
        if self.folder and self.last != progress.step:
            self.save(model, update, progress)

    def record(self) -> dict:
        return {"folder": str(self.folder) if self.folder else None, "bytes": self.bytes}


def _resume(folder: Path, model, update: Update, validation: Validation) -> Progress:
    """Restore weights, optimizer, scheduler, scaler, RNG, progress and the best weights from a step checkpoint."""
    state = checkpoint.load_trainer_state(folder)
    try:
        checkpoint.load_training_state(folder, model, update.optimizer, state)
        update.load_state(state)
        progress = Progress(**state["progress"])
    except (KeyError, RuntimeError, ValueError, TypeError, OSError) as e:
        raise TransferError(f"resume: checkpoint {folder} does not fit this run ({type(e).__name__}: {e})") from None
    validation.resume(folder.parent / "best", progress)
    checkpoint.set_rng_state(state["rng"])
    progress.resumed_from_step = progress.step
    log.info("resumed from %s at step %d", folder, progress.step)
    return progress

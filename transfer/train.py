"""The training loop, in plain PyTorch: read it top to bottom. The objective is a component.

One optimizer step = `grad_accum_steps` micro-batches that the objective draws from its
seeded, restartable stream of training examples (`micro_batch_size` examples each, or
rows of packed examples). The objective gives each micro-batch's loss as a sum and a
normaliser (the targets it scores); each sum is divided by the normalisers of the whole
step, so the update is the same however the step is split, and however many tokens a
mask leaves in each piece.

Every `eval_interval` steps and at the last step the validation split is judged; the
best value of the objective's `select` metric marks the best weights (the untrained model
counts, as step 0), early stopping watches it, and the final evaluation uses the best or
the last weights as `eval.weights` says. Time spent validating or checkpointing is not
training time.

Ctrl-C or SIGTERM stops the loop between two steps, where weights, optimizer, RNG and
data position agree: it saves a checkpoint there and raises Interrupted, so that
resume=true continues exactly. A second Ctrl-C stops at once.
"""

import collections
import contextlib
import json
import logging
import math
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from transfer.config.folders import resumable_config
from transfer.config.optimizer import learning_rate
from transfer.errors import Interrupted, TransferError
from transfer.fmt import duration
from transfer.training import checkpoint, distributed
from transfer.training.hardware import MachineLoad
from transfer.training.loss import LossOptions, smaller_chunks
from transfer.training.oom import MemoryPlan, optimizer_mover, reason_of
from transfer.training.optim import build_optimizer, build_scheduler
from transfer.training.pruning import Pruning

log = logging.getLogger(__name__)


@dataclass
class Progress:
    """Everything about a run's training so far that a resume needs besides tensors."""

    step: int = 0
    samples: int = 0  # examples drawn from the stream: where it restarts
    tokens: int = 0  # real tokens trained on, padding left out
    scored_tokens: int = 0
    positions: int = 0  # tokens and padding: what the model computed
    seconds: float = 0.0
    loss_first: float | None = None
    loss_last: float | None = None
    loss_curve: list = field(default_factory=list)
    validation_curve: list = field(default_factory=list)
    best_value: float = math.inf
    best_step: int | None = None
    evals_since_best: int = 0
    interval_loss: float = 0.0
    interval_steps: int = 0
    stop_reason: str | None = None
    resumed_from_step: int | None = None
    lr_last: float | None = None
    # the first step of each process's stretch of training (allocation, kernel choice): kept out of the steady rate
    warmup_seconds: float = 0.0
    warmup_tokens: int = 0
    # the sizes in use, once out of memory halved them (null: the config's)
    micro_batch_size: int | None = None
    grad_accum_steps: int | None = None


def plan_steps(cfg, steps_per_epoch: float) -> tuple[int, str]:
    """(optimizer steps, what bounds them): max_steps, epochs, or the first of the two."""
    candidates = []
    if cfg.max_steps is not None:
        candidates.append((cfg.max_steps, "max_steps"))
    if cfg.epochs is not None:
        candidates.append((max(1, math.ceil(cfg.epochs * steps_per_epoch - 1e-9)), "epochs"))
    return min(candidates)


class StopRequests:
    """Ctrl-C and SIGTERM, noted rather than raised, for the loop to act on between two steps."""

    def __init__(self):
        self.signal: str | None = None

    def _note(self, signum, frame):
        if self.signal is not None:  # asked twice: stop now
            raise Interrupted(self.signal)
        self.signal = "SIGTERM" if signum == signal.SIGTERM else "SIGINT"
        os.write(2, b"\nstopping after this step, with a checkpoint (Ctrl-C again to stop at once)\n")

    @contextlib.contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():  # only the main thread gets signals
            yield self
            return
        previous = {s: signal.signal(s, self._note) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


class Pace:
    """Training tokens per second over the last few logged steps, the first step of this process left out."""

    def __init__(self, window: int = 6):
        self.marks = collections.deque(maxlen=window)  # (training seconds, tokens, step)

    def mark(self, seconds: float, tokens: int, step: int) -> None:
        self.marks.append((seconds, tokens, step))

    def tokens_per_second(self, seconds: float, tokens: int) -> float | None:
        if not self.marks or seconds <= self.marks[0][0]:
            return None
        then, done, _ = self.marks[0]
        return (tokens - done) / (seconds - then)

    def seconds_left(self, seconds: float, step: int, last_step: int) -> float | None:
        if not self.marks or step <= self.marks[0][2]:
            return None
        then, _, first = self.marks[0]
        return (last_step - step) * (seconds - then) / (step - first)


def train(model, objective, splits, cfg, hardware, writer=None, run_dir: Path | None = None,
          resume_from: Path | None = None, baseline: dict | None = None, plan: MemoryPlan | None = None,
          trainee: distributed.Trainee | None = None) -> dict:  # fmt: skip
    """Train `model` on `objective`'s training split; `baseline` is the untrained model's validation result.

    `plan` holds the batch sizes in use and what to do when memory runs out (transfer.training.oom); `trainee`, the
    model as several processes share it (transfer.training.distributed), made before the optimizer sees its parameters.
    """
    trainee = trainee or distributed.Trainee(model, hardware.device)
    examples = splits["train"]
    plan = plan or MemoryPlan(cfg, hardware)
    per_step = cfg.micro_batch_size * cfg.grad_accum_steps  # halving keeps it
    total_steps, bound = plan_steps(cfg, objective.steps_per_epoch(examples, per_step))
    validate_every = cfg.eval_interval
    pruning = Pruning.from_config(cfg)  # in an Optuna search, this run's trial (transfer/search.py); else inert
    saving = cfg.checkpoint.enabled and run_dir is not None  # every rank takes part in a checkpoint (checkpoint.save)
    checkpoints = run_dir / "checkpoints" if run_dir is not None else None

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(model, cfg.optimizer, hardware.device, learning_rate(cfg)[0])
    scheduler = build_scheduler(optimizer, cfg.optimizer, total_steps)
    scaler = hardware.grad_scaler()
    max_norm = cfg.optimizer.grad_clip if cfg.optimizer.grad_clip is not None else math.inf
    if baseline and objective.select not in baseline:  # KTO's pair metrics on unpaired rows from the hub
        measured = ", ".join(m for m in objective.metrics if m in baseline)
        why = " (its rows are unpaired: no pair to compare)" if objective.name == "kto" else ""
        raise TransferError(
            f"objective.select={objective.select}: the validation split gives no {objective.select}{why}; "
            f"allowed with this data: {measured}"
        )
    # the untrained weights are the best until validation says otherwise
    best = baseline[objective.select] if baseline else objective.worst()
    progress = Progress(best_value=best, best_step=0 if validate_every else None)
    best_weights = checkpoint.trainable_state(model) if validate_every else None
    if resume_from is not None:
        progress, best_weights = _resume(resume_from, model, optimizer, scheduler, scaler, best_weights)
        if progress.micro_batch_size:  # halved before the interruption: go on at the sizes that fitted
            plan.micro, plan.accum = progress.micro_batch_size, progress.grad_accum_steps
    plan.movers = [model.to, optimizer_mover(optimizer), objective.to]
    stream = objective.stream(examples, cfg.seed, progress.samples, per_step)
    first_step = total_steps + 1 if progress.stop_reason else progress.step + 1  # an early stop stays stopped

    def save_step_checkpoint():
        nonlocal last_saved
        state = {
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "rng": checkpoint.rng_state(),
            "progress": asdict(progress),
        }
        folder = checkpoints / f"step-{progress.step:06d}"
        nbytes = checkpoint.save(folder, model, cfg.checkpoint.full_model, optimizer, state,
                                 config=resumable_config(cfg))  # fmt: skip
        if distributed.is_main():
            checkpoint.prune(checkpoints, cfg.checkpoint.keep)
        last_saved = progress.step  # the same on every rank, unlike what each sees on disk
        return nbytes

    model.train()
    # a bar on a terminal; in a log file (nohup, a cluster) its carriage returns would flood it: lines instead
    bar = tqdm(total=total_steps, initial=progress.step, desc="train", unit="step", dynamic_ncols=True,
               disable=distributed.bars_off())  # fmt: skip
    pace = Pace()
    hardware.synchronize()
    started = time.perf_counter()
    machine = MachineLoad()
    saved_bytes, last_saved = None, progress.resumed_from_step
    stop = StopRequests()
    seconds_before = progress.seconds  # of training before this process's stretch (a resumed run's)
    with logging_redirect_tqdm(), stop.installed():  # log lines print above the bar, not through it
        for step in range(first_step, total_steps + 1):
            # between two steps: the state on disk is the state of a step's end (in several processes, the same step)
            if distributed.any_rank(stop.signal is not None, hardware.device):
                stop.signal = stop.signal or "SIGTERM"  # another rank's stop: the launcher stopped them all
                hardware.synchronize()
                progress.seconds += time.perf_counter() - started
                if saving and last_saved != progress.step:
                    save_step_checkpoint()
                log.info("stopped after step %d by %s; checkpoint %s", progress.step, stop.signal,
                         "saved" if saving else "off (checkpoint.enabled=false): a resume starts over")  # fmt: skip
                raise Interrupted(stop.signal)
            start, rng = stream.position, checkpoint.rng_state()
            while True:  # the step, tried again from its start on smaller pieces (or the CPU) while memory runs out
                try:
                    step_loss, batches, normaliser = _forward_backward(trainee, objective, examples, stream, plan,
                                                                       scaler, hardware)  # fmt: skip
                    break
                except torch.OutOfMemoryError as e:
                    if not plan.can_recover():
                        fixes = memory_fixes(plan.micro, plan.accum, cfg.block_size, hardware)
                        with hardware.explain_out_of_memory(
                            f"training at micro_batch_size={plan.micro}, block_size={cfg.block_size}", fixes
                        ):
                            raise
                    reason = reason_of(e)
                optimizer.zero_grad(set_to_none=True)
                plan.recover(f"training step {step}", reason)
                if hardware.device.type == "cpu" and plan.policy == "cpu":
                    scaler = hardware.grad_scaler()  # fp32 on the CPU: no loss scaling
                stream.position = start
                checkpoint.set_rng_state(rng)
            progress.micro_batch_size, progress.grad_accum_steps = plan.micro, plan.accum
            scaler.unscale_(optimizer)
            grad_norm = distributed.clip_grad_norm(params, max_norm)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            lr = progress.lr_last = scheduler.get_last_lr()[0]  # the rate this step used
            scheduler.step()
            progress.step = step
            progress.samples = stream.position
            progress.tokens += sum(b.tokens for b in batches)
            progress.scored_tokens += normaliser
            progress.positions += sum(b.positions for b in batches)
            value = step_loss.item() / normaliser  # one wait for the device per optimizer step
            if not math.isfinite(value):
                raise TransferError(
                    f"training loss became {value} at step {step}; lower optimizer.lr={learning_rate(cfg)[0]}?"
                )
            progress.loss_first = value if progress.loss_first is None else progress.loss_first
            progress.loss_last = value
            progress.interval_loss += value
            progress.interval_steps += 1
            if step == first_step:  # this process's first step: allocations and kernel choices, not the pace
                trained = progress.seconds + time.perf_counter() - started
                progress.warmup_seconds += trained - seconds_before
                progress.warmup_tokens += sum(b.tokens for b in batches)
                pace.mark(trained, progress.tokens, step)
            logging_step = step in (1, total_steps) or step % cfg.log_interval == 0
            if logging_step:
                machine.sample()
                mean = progress.interval_loss / progress.interval_steps
                progress.interval_loss, progress.interval_steps = 0.0, 0
                hardware.synchronize()
                trained = progress.seconds + time.perf_counter() - started
                tokens_per_s = pace.tokens_per_second(trained, progress.tokens)
                left = pace.seconds_left(trained, step, total_steps)
                if step != first_step:
                    pace.mark(trained, progress.tokens, step)
                progress.loss_curve.append({"step": step, "loss": mean})
                rate = f"{tokens_per_s:,.0f}" if tokens_per_s else "-"
                bar.set_postfix(loss=f"{mean:.4g}", tok_s=rate)
                if bar.disable:
                    log.info("step %d/%d · loss %.4g · %s tok/s%s", step, total_steps, mean, rate,
                             f" · {duration(left)} of training left" if left is not None else "")  # fmt: skip
                if writer is not None:
                    writer.add_scalar("train/loss", mean, step)
                    writer.add_scalar("train/lr", lr, step)
                    writer.add_scalar("train/grad_norm", grad_norm.item(), step)
                    if tokens_per_s:
                        writer.add_scalar("train/tokens_per_second", tokens_per_s, step)
            bar.update(1)

            validating = validate_every and (step % validate_every == 0 or step == total_steps)
            saving_now = saving and cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0
            if not (validating or saving_now):
                continue
            hardware.synchronize()
            progress.seconds += time.perf_counter() - started
            if validating:
                result = plan.evaluate(lambda size: trainee.use(objective.evaluate, splits["validation"], size, hardware,
                                                                "validate"), f"validation at step {step}")  # fmt: skip
                model.train()
                progress.validation_curve.append({"step": step, **result})
                log.info("step %d: validation %s", step, describe_metrics(result))
                if writer is not None:
                    log_metrics(writer, "validation", result, step)
                value = result.get(objective.select)
                if value is not None and objective.better(value, progress.best_value, cfg.early_stopping.min_delta):
                    progress.best_value, progress.best_step, progress.evals_since_best = value, step, 0
                    best_weights = checkpoint.trainable_state(model)
                    if saving:
                        meta = {"step": step, objective.select: value}
                        checkpoint.save(
                            checkpoints / "best",
                            model,
                            cfg.checkpoint.full_model,
                            meta=meta,
                            config=resumable_config(cfg),
                        )  # whose they are (restore.check_own)
                else:
                    progress.evals_since_best += 1
                if cfg.early_stopping.patience and progress.evals_since_best >= cfg.early_stopping.patience:
                    progress.stop_reason = "early_stop"
                    log.info(
                        "early stop at step %d: %d validations without improvement since step %d",
                        step, progress.evals_since_best, progress.best_step,
                    )  # fmt: skip
                # an Optuna search's pruner judges this trial against the others: rank 0 reports, every rank stops
                if distributed.any_rank(pruning.report(step, result), hardware.device):
                    progress.stop_reason = "pruned"
            if saving_now:
                saved_bytes = save_step_checkpoint()
            started = time.perf_counter()
            if progress.stop_reason:
                break
    hardware.synchronize()
    progress.seconds += time.perf_counter() - started
    bar.close()
    progress.stop_reason = progress.stop_reason or bound
    last_step = progress.step
    if saving and last_saved != last_step:
        saved_bytes = save_step_checkpoint()

    final_step = last_step
    if cfg.eval.weights.value == "best" and best_weights is not None and progress.best_step != last_step:
        checkpoint.restore_trainable(model, best_weights)
        final_step = progress.best_step
        log.info("final evaluation on the best weights, from step %d", final_step)

    tokens, seconds = progress.tokens, progress.seconds
    return {
        "seconds": seconds,
        "steps": last_step,
        "planned_steps": total_steps,
        "epochs": objective.epochs(progress.samples, examples),
        "stop_reason": progress.stop_reason,
        "tokens": tokens,  # real tokens, padding left out
        "scored_tokens": progress.scored_tokens,  # the targets the loss counted (an answer's, for sft)
        "padding_share": 1 - tokens / progress.positions if progress.positions else None,
        "samples": progress.samples,
        "tokens_per_second": tokens / seconds if seconds > 0 else None,
        "samples_per_second": progress.samples / seconds if seconds > 0 else None,
        # the first step of each process's stretch: allocations, kernel choices, and compiling (hardware.compile)
        "warmup_seconds": progress.warmup_seconds,
        # the same, without the first step of each process (allocations, kernel choices): the steady pace
        "tokens_per_second_after_first_step": (
            (tokens - progress.warmup_tokens) / (seconds - progress.warmup_seconds)
            if tokens > progress.warmup_tokens and seconds > progress.warmup_seconds
            else None
        ),
        "machine": machine.summary(),  # this process's stretch: CPU time, load, whether it shared the CPUs
        "loss_first": progress.loss_first,
        "loss_last": progress.loss_last,
        "lr_last": progress.lr_last,
        "best_step": progress.best_step,
        "select": objective.select,
        "best_value": progress.best_value if progress.best_step is not None else None,
        "final_weights": {"which": cfg.eval.weights.value if best_weights is not None else "last", "step": final_step},
        "resumed_from_step": progress.resumed_from_step,
        "checkpoint": {"folder": str(checkpoints) if saving else None, "bytes": saved_bytes},
        "loss_curve": progress.loss_curve,
        "validation_curve": progress.validation_curve,
    }


def describe_metrics(result: dict) -> str:
    """'loss 2.31, perplexity 10.1, auc 0.612': the metrics of an evaluation, for a log line."""
    return ", ".join(f"{k} {v:.4g}" for k, v in result.items() if isinstance(v, float))


def log_metrics(writer, split: str, result: dict, step: int) -> None:
    for key, value in result.items():
        if isinstance(value, float):
            writer.add_scalar(f"{split}/{key}", value, step)


def _forward_backward(trainee, objective, examples, stream, plan, scaler, hardware):
    """One step's forward and backward passes: (summed loss, its batches, the step's normaliser).

    In several processes each computes its share of the step's micro-batches (transfer.training.distributed).
    """
    # the whole step's batches first: their scored targets are what every sum is divided by
    batches = [objective.batch(examples, stream, plan.micro) for _ in range(plan.accum)]
    trainee.use(objective.begin_step, batches, hardware)
    normaliser = sum(b.normaliser for b in batches)
    step_loss = torch.zeros((), device=hardware.device)
    mine = distributed.my_share(batches)
    for i, batch in enumerate(mine):
        with trainee.sync(last=i == len(mine) - 1):  # gradients all-reduced once a step, after its last share
            with hardware.autocast():
                loss_sum, _, _ = trainee(objective.loss, batch.to(hardware.device), LossOptions.of(hardware))
            scaler.scale(loss_sum * trainee.gradient_scale / normaliser).backward()
        step_loss += loss_sum.detach()
    return distributed.summed(step_loss, hardware.device), batches, normaliser


def memory_fixes(micro: int, accum: int, block_size: int, hardware) -> list[str]:
    """Settings that need less memory for the same training: the same batch per step in smaller pieces first."""
    if micro > 1:
        fixes = [f"micro_batch_size={micro // 2} grad_accum_steps={accum * 2} (the same batch per step)"]
    else:
        fixes = [f"block_size={block_size // 2}"]
    # Liger's training loss makes its own chunks: ours' size changes nothing there
    chunks = smaller_chunks(hardware.loss_chunk_tokens, micro * block_size) if hardware.kernels != "liger" else []
    return [*fixes, *chunks, "a strategy that trains less (adapter, lora)"]


def _resume(folder: Path, model, optimizer, scheduler, scaler, best_weights):
    """Restore weights, optimizer, scheduler, scaler, RNG and progress from a step checkpoint."""
    state = checkpoint.load_trainer_state(folder)
    try:
        checkpoint.load_training_state(folder, model, optimizer, state)
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        progress = Progress(**state["progress"])
    except (KeyError, RuntimeError, ValueError, TypeError, OSError) as e:
        raise TransferError(f"resume: checkpoint {folder} does not fit this run ({type(e).__name__}: {e})") from None
    best = folder.parent / "best"
    if progress.best_step:  # step 0 is the untrained model: best_weights holds it already
        saved_step = json.loads((best / "best.json").read_text())["step"] if (best / "best.json").is_file() else None
        problem = (
            distributed.from_rank_zero(lambda: checkpoint.damage(best)) if saved_step == progress.best_step else None
        )
        if problem:
            log.warning("best weights of step %s are damaged (%s): the final evaluation cannot use them",
                        saved_step, problem)  # fmt: skip
            best_weights = None
        elif saved_step == progress.best_step:
            current = checkpoint.trainable_state(model)
            checkpoint.load_weights(best, model)
            best_weights = checkpoint.trainable_state(model)
            checkpoint.restore_trainable(model, current)
        else:  # best/ was overwritten after this checkpoint; the same training finds that step again
            log.warning("best weights of step %s are not on disk (best/ holds step %s)", progress.best_step, saved_step)
            best_weights = None
    checkpoint.set_rng_state(state["rng"])
    progress.resumed_from_step = progress.step
    log.info("resumed from %s at step %d", folder, progress.step)
    return progress, best_weights

"""Where a run's training stands and how it is told: `Progress` (what a resume needs besides tensors), the number
of steps, Ctrl-C and SIGTERM noted for the loop, the training clock, and each step's bar, log line and scalars.
"""

import collections
import contextlib
import logging
import math
import os
import signal
import threading
import time
from dataclasses import dataclass, field

from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from transfer.errors import Interrupted
from transfer.fmt import duration
from transfer.training import distributed
from transfer.training.hardware import MachineLoad

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

    def add(self, step: int, done, samples: int, plan) -> None:
        """A step done (transfer.training.step.Done), the stream at `samples`, at the sizes `plan` uses now."""
        self.micro_batch_size, self.grad_accum_steps = plan.micro, plan.accum
        self.lr_last = done.lr
        self.step, self.samples = step, samples
        self.tokens += sum(b.tokens for b in done.batches)
        self.scored_tokens += done.normaliser
        self.positions += sum(b.positions for b in done.batches)
        self.loss_first = done.loss if self.loss_first is None else self.loss_first
        self.loss_last = done.loss
        self.interval_loss += done.loss
        self.interval_steps += 1


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

    def asked(self, device) -> bool:
        """Whether any process was asked to stop (another rank's stop: the launcher stopped them all)."""
        if distributed.any_rank(self.signal is not None, device):
            self.signal = self.signal or "SIGTERM"
        return self.signal is not None


class Clock:
    """Training time: the time spent validating or checkpointing is left out (pause, then go on)."""

    def __init__(self, progress: Progress, hardware):
        self.progress, self.hardware = progress, hardware
        self.before = progress.seconds  # of training before this process's stretch (a resumed run's)
        hardware.synchronize()
        self.started = time.perf_counter()

    def trained(self) -> float:
        return self.progress.seconds + time.perf_counter() - self.started

    def pause(self) -> None:
        self.hardware.synchronize()
        self.progress.seconds += time.perf_counter() - self.started

    def go_on(self) -> None:
        self.started = time.perf_counter()


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


class Report:
    """Each step told: a bar on a terminal, and every `log_interval` steps the mean loss, the rate and the pace to
    the loggers (and as a line where there is no bar: in a log file its carriage returns would flood it)."""

    def __init__(self, progress: Progress, clock: Clock, total_steps: int, log_interval: int, logger):
        self.progress, self.clock, self.logger = progress, clock, logger
        self.total, self.every = total_steps, log_interval
        self.first_step = progress.step + 1
        self.bar = tqdm(total=total_steps, initial=progress.step, desc="train", unit="step", dynamic_ncols=True,
                        disable=distributed.bars_off())  # fmt: skip
        self.pace = Pace()
        self.machine = MachineLoad()  # this process's stretch: CPU time, load, whether it shared the CPUs

    def __enter__(self):
        self._redirect = logging_redirect_tqdm()  # log lines print above the bar, not through it
        self._redirect.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._redirect.__exit__(*exc)

    def step(self, step: int, done) -> None:
        p = self.progress
        if step == self.first_step:  # this process's first step: allocations and kernel choices, not the pace
            trained = self.clock.trained()
            p.warmup_seconds += trained - self.clock.before
            p.warmup_tokens += sum(b.tokens for b in done.batches)
            self.pace.mark(trained, p.tokens, step)
        if step in (1, self.total) or step % self.every == 0:
            self._log(step, done)
        self.bar.update(1)

    def _log(self, step: int, done) -> None:
        p = self.progress
        self.machine.sample()
        mean = p.interval_loss / p.interval_steps
        p.interval_loss, p.interval_steps = 0.0, 0
        self.clock.hardware.synchronize()
        trained = self.clock.trained()
        tokens_per_s = self.pace.tokens_per_second(trained, p.tokens)
        left = self.pace.seconds_left(trained, step, self.total)
        if step != self.first_step:
            self.pace.mark(trained, p.tokens, step)
        p.loss_curve.append({"step": step, "loss": mean})
        rate = f"{tokens_per_s:,.0f}" if tokens_per_s else "-"
        self.bar.set_postfix(loss=f"{mean:.4g}", tok_s=rate)
        if self.bar.disable:
            log.info("step %d/%d · loss %.4g · %s tok/s%s", step, self.total, mean, rate,
                     f" · {duration(left)} of training left" if left is not None else "")  # fmt: skip
        scalars = {"train/loss": mean, "train/lr": done.lr, "train/grad_norm": done.grad_norm.item()}
        self.logger.scalars({**scalars, "train/tokens_per_second": tokens_per_s} if tokens_per_s else scalars, step)

    def close(self) -> None:
        self.bar.close()


def result(progress: Progress, planned_steps: int, epochs: float, machine: MachineLoad, select: str,
           final_weights: dict, checkpoint: dict) -> dict:  # fmt: skip
    """The record's `train`."""
    p, tokens, seconds = progress, progress.tokens, progress.seconds
    return {
        "seconds": seconds,
        "steps": p.step,
        "planned_steps": planned_steps,
        "epochs": epochs,
        "stop_reason": p.stop_reason,
        "tokens": tokens,  # real tokens, padding left out
        "scored_tokens": p.scored_tokens,  # the targets the loss counted (an answer's, for sft)
        "padding_share": 1 - tokens / p.positions if p.positions else None,
        "samples": p.samples,
        "tokens_per_second": tokens / seconds if seconds > 0 else None,
        "samples_per_second": p.samples / seconds if seconds > 0 else None,
        # the first step of each process's stretch: allocations, kernel choices, and compiling (hardware.compile)
        "warmup_seconds": p.warmup_seconds,
        # the same, without the first step of each process (allocations, kernel choices): the steady pace
        "tokens_per_second_after_first_step": (
            (tokens - p.warmup_tokens) / (seconds - p.warmup_seconds)
            if tokens > p.warmup_tokens and seconds > p.warmup_seconds
            else None
        ),
        "machine": machine.summary(),  # this process's stretch: CPU time, load, whether it shared the CPUs
        "loss_first": p.loss_first,
        "loss_last": p.loss_last,
        "lr_last": p.lr_last,
        "best_step": p.best_step,
        "select": select,
        "best_value": p.best_value if p.best_step is not None else None,
        "final_weights": final_weights,
        "resumed_from_step": p.resumed_from_step,
        "checkpoint": checkpoint,
        "loss_curve": p.loss_curve,
        "validation_curve": p.validation_curve,
    }

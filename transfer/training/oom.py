"""What a run does when its device runs out of memory (`hardware.on_oom`).

- `fail`: one line that names the settings and what would fit (hardware.explain_out_of_memory).
- `halve` (default): the step is tried again with `micro_batch_size` halved and
  `grad_accum_steps` doubled, down to 1: the same examples in the same step, and, since each
  step's sums are divided by the whole step's normaliser, the same update. An evaluation
  halves `eval_batch_size` the same way. The sizes reached hold for the rest of the run.
- `cpu`: the model (with the optimizer's state and any reference model) moves to the CPU in
  fp32, half-precision weights cast to it (no autocast runs there: the record's fp32 is what
  computes), and the step or evaluation is tried again there.

Every change is a line in the log and an entry of the record's `memory_plan.events`.
"""

import gc
import logging

import torch

from transfer.errors import TransferError, first_line
from transfer.training import distributed
from transfer.training.hardware import OutOfMemory

log = logging.getLogger(__name__)
OUT_OF_MEMORY = (torch.OutOfMemoryError, OutOfMemory)


class MemoryPlan:
    """The batch sizes a run uses now, and what it does when the device runs out of memory."""

    def __init__(self, cfg, hardware):
        self.policy = cfg.hardware.on_oom.value
        self.hardware = hardware
        self.micro, self.accum = cfg.micro_batch_size, cfg.grad_accum_steps
        self.eval_batch_size = cfg.eval_batch_size
        self.events: list[dict] = []
        # what moves to the CPU with the model (the optimizer, a reference model): each called move(device, dtype)
        self.movers: list = []

    def can_recover(self, evaluation: bool = False) -> bool:
        if distributed.active():  # one rank trying again alone would leave the others waiting in an all-reduce
            return False
        if self.policy == "halve":
            return (self.eval_batch_size if evaluation else self.micro) > 1
        return self.policy == "cpu" and self.hardware.device.type != "cpu"

    def recover(self, at: str, reason: str, evaluation: bool = False) -> None:
        """Halve the batch or move to the CPU, after the failed attempt's memory is freed; record it."""
        release_memory()
        if self.policy == "halve" and evaluation:
            change = f"eval_batch_size {self.eval_batch_size} -> {self.eval_batch_size // 2}"
            self.eval_batch_size //= 2
        elif self.policy == "halve":
            change = (f"micro_batch_size {self.micro} -> {self.micro // 2}, "
                      f"grad_accum_steps {self.accum} -> {self.accum * 2} (the same batch per step)")  # fmt: skip
            self.micro, self.accum = self.micro // 2, self.accum * 2
        else:
            for move in self.movers:
                move(torch.device("cpu"), torch.float32)
            change = f"moved from {self.hardware.device} ({self.hardware.precision}) to cpu (fp32)"
            self.hardware.device, self.hardware.precision = torch.device("cpu"), "fp32"
            release_memory()
        self.events.append({"at": at, "change": change, "reason": reason})
        log.warning("out of memory at %s: %s (hardware.on_oom=%s)", at, change, self.policy)

    def evaluate(self, evaluate_with, at: str):
        """evaluate_with(batch_size), tried again on smaller batches (or on the CPU) while memory runs out."""
        while True:
            try:
                return evaluate_with(self.eval_batch_size)
            except OUT_OF_MEMORY as e:
                if not self.can_recover(evaluation=True):
                    if isinstance(e, OutOfMemory):  # explained where it ran out, with that evaluator's fixes
                        raise
                    size = self.eval_batch_size
                    fixes = [f"eval_batch_size={size // 2}" if size > 1 else "a smaller block_size"]
                    with self.hardware.explain_out_of_memory(f"in the {at} at eval_batch_size={size}", fixes):
                        raise
                reason = reason_of(e)
            self.recover(at, reason, evaluation=True)

    def record(self) -> dict:
        return {"policy": self.policy, "micro_batch_size": self.micro, "grad_accum_steps": self.accum,
                "eval_batch_size": self.eval_batch_size, "events": self.events}  # fmt: skip


def reason_of(e: BaseException) -> str:
    """What ran out, for the record's memory_plan events."""
    return first_line(e) if isinstance(e, TransferError) else f"{type(e).__name__}: {first_line(e)}"


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def optimizer_mover(optimizer):
    """Moves an optimizer's state (AdamW's moments) along with its parameters, cast as they are."""

    def move(device, dtype=None):
        for state in optimizer.state.values():
            for key, value in state.items():
                if torch.is_tensor(value):  # the fused kernel keeps `step` on the parameters' device too
                    cast = dtype if dtype is not None and value.is_floating_point() else None
                    state[key] = value.to(device, cast)

    return move

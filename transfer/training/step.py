"""One optimizer step: the forward and backward passes of its micro-batches, tried again from its start while
memory runs out (transfer.training.oom), then the update (clipping, loss scaling, the schedule).

The objective gives each micro-batch's loss as a sum and a normaliser (the targets it scores); each sum is divided
by the normalisers of the whole step, so the update is the same however the step is split (micro-batches, halving
after out of memory, several processes), and however many tokens a mask leaves in each piece.
"""

import math
from dataclasses import dataclass

import torch

from transfer.config.optimizer import learning_rate
from transfer.errors import TransferError
from transfer.training import checkpoint, distributed
from transfer.training.loss import LossOptions, smaller_chunks
from transfer.training.oom import reason_of
from transfer.training.optim import build_optimizer, build_scheduler


@dataclass
class Done:
    """What a step did: its mean loss, its batches, the targets it scored, the rate it used, the gradients' norm."""

    loss: float
    batches: list
    normaliser: int
    lr: float
    grad_norm: torch.Tensor


class Update:
    """The optimizer, its schedule, loss scaling and clipping of the parameters that train; `step` takes a step."""

    def __init__(self, model, cfg, hardware, total_steps: int):
        self.cfg, self.hardware = cfg, hardware
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(model, cfg.optimizer, hardware.device, learning_rate(cfg)[0])
        self.scheduler = build_scheduler(self.optimizer, cfg.optimizer, total_steps)
        self.scaler = hardware.grad_scaler()
        self.max_norm = cfg.optimizer.grad_clip if cfg.optimizer.grad_clip is not None else math.inf

    def state(self) -> dict:
        """The schedule's and the scaler's state, for a step checkpoint (the optimizer's is saved apart)."""
        return {"scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict()}

    def load_state(self, state: dict) -> None:
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])

    def step(self, number: int, trainee, objective, examples, stream, plan) -> Done:
        """Step `number` on the next batches of `stream`, at the sizes `plan` holds (halved, or on the CPU, while
        memory runs out: the same examples, the same RNG, the same update)."""
        hardware, start, rng = self.hardware, stream.position, checkpoint.rng_state()
        while True:
            try:
                step_loss, batches, normaliser = forward_backward(trainee, objective, examples, stream, plan,
                                                                  self.scaler, hardware)  # fmt: skip
                break
            except torch.OutOfMemoryError as e:
                if not plan.can_recover():
                    fixes = memory_fixes(plan.micro, plan.accum, self.cfg.block_size, hardware)
                    with hardware.explain_out_of_memory(
                        f"training at micro_batch_size={plan.micro}, block_size={self.cfg.block_size}", fixes
                    ):
                        raise
                reason = reason_of(e)
            self.optimizer.zero_grad(set_to_none=True)
            plan.recover(f"training step {number}", reason)
            if hardware.device.type == "cpu" and plan.policy == "cpu":
                self.scaler = hardware.grad_scaler()  # fp32 on the CPU: no loss scaling
            stream.position = start
            checkpoint.set_rng_state(rng)
        self.scaler.unscale_(self.optimizer)
        grad_norm = distributed.clip_grad_norm(self.params, self.max_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.scheduler.get_last_lr()[0]  # the rate this step used
        self.scheduler.step()
        value = step_loss.item() / normaliser  # one wait for the device per optimizer step
        if not math.isfinite(value):
            raise TransferError(
                f"training loss became {value} at step {number}; lower optimizer.lr={learning_rate(self.cfg)[0]}?"
            )
        return Done(value, batches, normaliser, lr, grad_norm)


def forward_backward(trainee, objective, examples, stream, plan, scaler, hardware):
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

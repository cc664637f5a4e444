"""The training loop, in plain PyTorch: read it top to bottom.

One optimizer step = `grad_accum_steps` micro-batches of `micro_batch_size` whole
blocks. Blocks are drawn from a seeded stream of per-epoch permutations, so every
micro-batch is full (each step weighs the same number of tokens) and an epoch is
exactly one pass over the training blocks. Time spent validating is not counted
as training time.
"""

import logging
import math
import time

import torch
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from transfer.errors import TransferError
from transfer.evaluate import evaluate
from transfer.loss import summed_lm_loss
from transfer.optim import build_optimizer, build_scheduler

log = logging.getLogger(__name__)


def plan_steps(cfg, n_blocks: int) -> tuple[int, str]:
    """(optimizer steps, what bounds them): max_steps, epochs, or the first of the two."""
    per_step = cfg.micro_batch_size * cfg.grad_accum_steps
    candidates = []
    if cfg.max_steps is not None:
        candidates.append((cfg.max_steps, "max_steps"))
    if cfg.epochs is not None:
        candidates.append((max(1, math.ceil(cfg.epochs * n_blocks / per_step)), "epochs"))
    return min(candidates)


def block_stream(n_blocks: int, seed: int):
    """Indices of training blocks: a fresh seeded permutation per epoch, end to end."""
    epoch = 0
    while True:
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        yield from torch.randperm(n_blocks, generator=g).tolist()
        epoch += 1


def train(model, splits, cfg, hardware, writer=None) -> dict:
    blocks = splits["train"].input_ids
    n_blocks, block_size = blocks.shape
    total_steps, bound = plan_steps(cfg, n_blocks)
    micro, accum = cfg.micro_batch_size, cfg.grad_accum_steps

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(model, cfg.optimizer, hardware.device)
    scheduler = build_scheduler(optimizer, cfg.optimizer, total_steps)
    scaler = hardware.grad_scaler()
    max_norm = cfg.optimizer.grad_clip if cfg.optimizer.grad_clip is not None else math.inf
    stream = block_stream(n_blocks, cfg.seed)

    loss_curve, validation_curve = [], []
    loss_first = loss_last = None
    interval_loss, interval_steps = torch.zeros((), device=hardware.device), 0
    seconds = 0.0
    model.train()
    progress = tqdm(total=total_steps, desc="train", unit="step", dynamic_ncols=True)
    hardware.synchronize()
    started = time.perf_counter()
    with logging_redirect_tqdm():  # log lines print above the bar, not through it
        for step in range(1, total_steps + 1):
            step_loss = torch.zeros((), device=hardware.device)
            for _ in range(accum):
                idx = torch.tensor([next(stream) for _ in range(micro)])
                ids = blocks[idx].to(hardware.device, non_blocking=True)
                with hardware.autocast():
                    loss_sum, count = summed_lm_loss(model, ids, ids)
                    loss = loss_sum / count
                scaler.scale(loss / accum).backward()
                step_loss += loss.detach() / accum
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            lr = scheduler.get_last_lr()[0]  # the rate this step used
            scheduler.step()
            interval_loss += step_loss
            interval_steps += 1

            if step in (1, total_steps) or step % cfg.log_interval == 0:
                # .item() waits for the device: only on logging steps.
                value = step_loss.item()
                if not math.isfinite(value):
                    raise TransferError(
                        f"training loss became {value} at step {step}; lower optimizer.lr={cfg.optimizer.lr}?"
                    )
                if step == 1:
                    loss_first = value
                loss_last = value
                mean = (interval_loss / interval_steps).item()
                interval_loss.zero_()
                interval_steps = 0
                hardware.synchronize()
                elapsed = seconds + time.perf_counter() - started
                tokens_per_s = step * accum * micro * block_size / elapsed
                loss_curve.append({"step": step, "loss": mean})
                progress.set_postfix(loss=f"{mean:.4f}", tok_s=f"{tokens_per_s:,.0f}")
                if writer is not None:
                    writer.add_scalar("train/loss", mean, step)
                    writer.add_scalar("train/lr", lr, step)
                    writer.add_scalar("train/grad_norm", grad_norm.item(), step)
                    writer.add_scalar("train/tokens_per_second", tokens_per_s, step)
            progress.update(1)

            if cfg.eval_interval and step % cfg.eval_interval == 0 and step < total_steps:
                hardware.synchronize()
                seconds += time.perf_counter() - started
                result = evaluate(model, splits["validation"], cfg.eval_batch_size, hardware, desc="validate")
                model.train()
                validation_curve.append({"step": step, "loss": result["loss"], "perplexity": result["perplexity"]})
                log.info("step %d: validation loss %.4f, perplexity %.3f", step, result["loss"], result["perplexity"])
                if writer is not None:
                    writer.add_scalar("validation/loss", result["loss"], step)
                    writer.add_scalar("validation/perplexity", result["perplexity"], step)
                started = time.perf_counter()
    hardware.synchronize()
    seconds += time.perf_counter() - started
    progress.close()

    samples = total_steps * accum * micro
    tokens = samples * block_size
    return {
        "seconds": seconds,
        "steps": total_steps,
        "epochs": samples / n_blocks,
        "stop_reason": bound,
        "tokens": tokens,
        "samples": samples,
        "tokens_per_second": tokens / seconds,
        "samples_per_second": samples / seconds,
        "loss_first": loss_first,
        "loss_last": loss_last,
        "lr_last": scheduler.get_last_lr()[0],
        "loss_curve": loss_curve,
        "validation_curve": validation_curve,
    }

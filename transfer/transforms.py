"""What is done to the adapted model before it trains, in order: the attention kernel, gradient checkpointing,
compiling each block (the distributed wrap comes after, in transfer.distributed). One function, so that the
order is written once."""

import contextlib
import logging

import torch

from transfer.errors import TransferError, first_line


def apply_transforms(model, cfg, compile_blocks: bool = True) -> dict:
    """Transform `model` in place as cfg.hardware says; return what the record says was done.

    `compile_blocks=False` leaves compiling out (the memory estimate runs the blocks uncompiled, on fake tensors).
    """
    from transfer.strategies import model_parts

    hw = cfg.hardware
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if hw.attention.value != "auto":
        try:
            base.set_attn_implementation(hw.attention.value)
        except (ValueError, ImportError) as e:
            raise TransferError(
                f"hardware.attention={hw.attention.value}: {type(base).__name__} cannot use it here ({first_line(e)}); "
                "allowed: auto, sdpa, eager, flash_attention_2"
            ) from None
    done = {"attention": base.config._attn_implementation, "gradient_checkpointing": False, "compiled": None}
    if hw.gradient_checkpointing:
        if not getattr(base, "supports_gradient_checkpointing", False):
            raise TransferError(
                f"hardware.gradient_checkpointing=true: {type(base).__name__} does not support it; allowed: false"
            )
        # non-reentrant: frozen embeddings need no input gradients, and peft's and our fused loss's
        # calls of the decoder recompute each block in the backward pass alike
        kwargs = {"use_reentrant": False}
        if hasattr(base, "activation_checkpointing_enable"):  # the newer transformers' name; the old one warns
            base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        done["gradient_checkpointing"] = True
    if hw.compile and compile_blocks:
        # A sweep's jobs share one process: each starts from nothing, or the earlier jobs' versions of the block's
        # code would count against this one's limit, beyond which torch.compile runs the code uncompiled.
        torch.compiler.reset()
        torch._dynamo.config.recompile_limit = RECOMPILE_LIMIT
        _gave_up.watch()
        # per block, as torchtune does: one block's code compiles once and serves every block (the weights
        # are the graph's inputs), in seconds rather than the minutes of a whole model, and the parameter names
        # (checkpoints) stay as they were
        blocks = model_parts(model).blocks
        for block in blocks:
            block.compile(mode=hw.compile_mode)
        done["compiled"] = {"what": "each decoder block", "blocks": len(blocks), "mode": hw.compile_mode}
    return done


# Versions of one compiled function (training's and evaluation's, batch sizes halved after out-of-memory, the last
# short batch) before torch.compile gives up on it; its default, 8, left one run of a 4-step LoRA job 3 to spare.
RECOMPILE_LIMIT = 32


class _GaveUp(logging.Handler):
    """torch.compile's one log line when it gives up on a function, which then runs uncompiled: kept for the record."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines = []

    def watch(self) -> None:
        self.lines = []
        source = logging.getLogger("torch._dynamo.convert_frame")
        if self not in source.handlers:
            source.addHandler(self)

    def emit(self, record) -> None:
        message = record.getMessage()
        if "hit config." in message:
            self.lines.append(" ".join(line.strip() for line in message.splitlines()[:3]))


_gave_up = _GaveUp()


def compile_gave_up() -> list[str]:
    """What torch.compile gave up on during this job (its own words), which then ran uncompiled."""
    return list(_gave_up.lines)


def uncompiled():
    """Compiled blocks run as plain PyTorch inside: for generation, whose cache changes shape at every token,
    and for forward hooks, which would each make torch.compile compile again."""
    if not hasattr(torch.compiler, "set_stance"):  # torch < 2.6: compiled blocks compile for these too
        return contextlib.nullcontext()
    return torch.compiler.set_stance("force_eager")

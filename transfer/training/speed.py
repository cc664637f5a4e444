"""What is done to the adapted model before it trains, in order: the attention kernel, Liger's kernels, gradient
checkpointing, compiling each block (the distributed wrap comes after, in transfer.training.distributed). One function, so
that the order is written once."""

import importlib.metadata
import logging
import sys

import torch

from transfer.errors import TransferError, first_line


def apply_transforms(model, cfg, estimate: bool = False) -> dict:
    """Transform `model` in place as cfg.hardware says; return what the record says was done.

    `estimate=True` checks the settings but leaves out compiling and Liger's kernels: the memory estimate runs the
    model uncompiled, on fake tensors, which Triton's kernels cannot take.
    """
    from transfer.models.anatomy import base_model, model_parts

    hw = cfg.hardware
    base = base_model(model)
    if hw.attention.value != "auto":
        try:
            base.set_attn_implementation(hw.attention.value)
        except (ValueError, ImportError) as e:
            raise TransferError(
                f"hardware.attention={hw.attention.value}: {type(base).__name__} cannot use it here ({first_line(e)}); "
                "allowed: auto, sdpa, eager, flash_attention_2"
            ) from None
    done = {"attention": base.config._attn_implementation, "kernels": "torch", "gradient_checkpointing": False,
            "compiled": None}  # fmt: skip
    if hw.kernels.value == "liger":
        done["kernels"] = _apply_liger(base, cfg.objective.name, patch=not estimate)
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
    if hw.compile and not estimate:
        # A sweep's jobs share one process: each starts from nothing, or the earlier jobs' versions of the block's
        # code would count against this one's limit, beyond which torch.compile runs the code uncompiled.
        torch.compiler.reset()
        # its name since torch 2.6 (cache_size_limit before)
        limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
        setattr(torch._dynamo.config, limit, RECOMPILE_LIMIT)
        # per block, as torchtune does: one block's code compiles once and serves every block (the weights
        # are the graph's inputs), in seconds rather than the minutes of a whole model, and the parameter names
        # (checkpoints) stay as they were
        blocks = model_parts(model).blocks
        for block in blocks:
            block.compile(mode=hw.compile_mode)
        done["compiled"] = {"what": "each decoder block", "blocks": len(blocks), "mode": hw.compile_mode}
    return done


# transformers' module attributes that Liger replaced: (module, name) -> the original (_GONE: there was none)
_LIGER_REPLACED = {}
_GONE = object()


def _apply_liger(base, objective: str, patch: bool) -> dict:
    """Liger's kernels in `base`'s norms, MLPs and rotary embeddings, and its fused linear cross-entropy as the
    training loss (transfer/loss.py). Liger replaces the modeling module's classes and functions, for every model
    of the type in the process: the classes go back at once (the model is built), the functions that the blocks
    call at each step go back when the job ends (undo_liger, from transfer.run.JobContext)."""
    import inspect

    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN, _apply_liger_kernel_to_instance

    from transfer.config.objective import spec
    from transfer.training import loss

    name, model_type = type(base).__name__, base.config.model_type
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        raise TransferError(
            f"hardware.kernels=liger: liger-kernel has no kernels for {name} (model type {model_type!r}); "
            "allowed for it: torch"
        )
    if not type(base).__module__.startswith("transformers.models."):  # Liger patches transformers' code, not this
        raise TransferError(
            f"hardware.kernels=liger: {name} is the model's own code ({type(base).__module__}, trust_remote_code), "
            "which Liger's kernels do not patch; allowed for it: torch"
        )
    act = getattr(base.config, "hidden_act", None)
    if "swiglu" in inspect.signature(MODEL_TYPE_TO_APPLY_LIGER_FN[model_type]).parameters and act not in (
        None, "silu", "swish"
    ):  # fmt: skip
        raise TransferError(  # Liger's SwiGLU is SiLU's: it would change what the model computes
            f"hardware.kernels=liger: {name}'s MLP activation is {act!r}, and Liger's SwiGLU kernel computes silu; "
            "allowed for it: torch"
        )
    head = base.get_output_embeddings()
    done = {"name": "liger", "version": importlib.metadata.version("liger-kernel"), "model_type": model_type}
    if not spec(objective).token_loss:
        done["loss"] = f"{objective}'s own, from sequence log-probabilities"
    elif loss.plain_head(head):
        done["loss"] = "Liger's fused linear cross-entropy, where the logits are the head's output"
    else:
        done["loss"] = f"ours: Liger's fused loss takes a bias-free torch.nn.Linear head, not {type(head).__name__}"
    if not patch:
        return done
    module = sys.modules[type(base).__module__]
    before = dict(vars(module))
    own_forward = sum("forward" in vars(m) for m in base.modules())
    try:  # the loss is ours to choose (above): the model's own forward() and cross-entropy stay as they are
        _apply_liger_kernel_to_instance(model=base, cross_entropy=False, fused_linear_cross_entropy=False)
    finally:  # kept for undo_liger, and the classes put back, even when patching failed halfway
        replaced = sorted(attr for attr, value in vars(module).items() if before.get(attr, _GONE) is not value)
        for attr in replaced:
            original = before.get(attr, _GONE)
            _LIGER_REPLACED.setdefault((module, attr), original)
            if isinstance(original, type):
                setattr(module, attr, original)
    done["modules"] = sum("forward" in vars(m) for m in base.modules()) - own_forward
    done["functions"] = [attr for attr in replaced if not isinstance(before.get(attr), type)]
    return done


def undo_liger() -> None:
    """Transformers' own functions back in the modules Liger patched: at the end of each job (run.JobContext)."""
    for (module, name), original in _LIGER_REPLACED.items():
        if original is _GONE:
            delattr(module, name)
        else:
            setattr(module, name, original)
    _LIGER_REPLACED.clear()


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

    def stop(self) -> None:
        logging.getLogger("torch._dynamo.convert_frame").removeHandler(self)

    def emit(self, record) -> None:
        message = record.getMessage()
        if "hit config." in message:
            self.lines.append(" ".join(line.strip() for line in message.splitlines()[:3]))


_gave_up = _GaveUp()


def watch_compile() -> None:
    """From now on, until stop_watching_compile(): what torch.compile gives up on (a job's: run.JobContext)."""
    _gave_up.watch()


def stop_watching_compile() -> None:
    _gave_up.stop()


def compile_gave_up() -> list[str]:
    """What torch.compile gave up on during this job (its own words), which then ran uncompiled."""
    return list(_gave_up.lines)

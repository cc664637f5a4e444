"""What is done to the adapted model before it trains, in order: gradient checkpointing (then, in time,
compiling and the distributed wrap). One function, so that the order is written once."""

from transfer.errors import TransferError


def apply_transforms(model, cfg) -> dict:
    """Transform `model` in place as cfg.hardware says; return what the record says was done."""
    done = {"gradient_checkpointing": False}
    if cfg.hardware.gradient_checkpointing:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
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
    return done

"""What people read on the console: durations and metrics in logs and progress lines, without third-party notices
that would hide them."""

import logging
import warnings


def duration(seconds: float) -> str:
    """'2 h 5 min', '3 min 20 s', '42 s', '0.35 s': whole units where they are big enough to read."""
    if seconds < 10:
        return f"{seconds:.2g} s"
    minutes, s = divmod(round(seconds), 60)
    hours, m = divmod(minutes, 60)
    return f"{hours} h {m} min" if hours else f"{m} min {s} s" if m else f"{s} s"


def describe_metrics(result: dict) -> str:
    """'loss 2.31, perplexity 10.1, auc 0.612': the metrics of an evaluation, for a log line."""
    return ", ".join(f"{k} {v:.4g}" for k, v in result.items() if isinstance(v, float))


def quiet_known_notices() -> None:
    """Third-party notices that are harmless here and would hide the lines a user must read."""
    # bitsandbytes looks for an optional CPU kernel package when peft imports it; 4-bit runs on CUDA only here
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    # peft asks transformers for a renamed attribute; nothing for a user to change
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)

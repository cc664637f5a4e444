"""How numbers are written for people: durations and metrics in logs and progress lines."""


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

"""How numbers are written for people: durations in logs and progress lines."""


def duration(seconds: float) -> str:
    """'2 h 5 min', '3 min 20 s', '42 s', '0.35 s': whole units where they are big enough to read."""
    if seconds < 10:
        return f"{seconds:.2g} s"
    minutes, s = divmod(round(seconds), 60)
    hours, m = divmod(minutes, 60)
    return f"{hours} h {m} min" if hours else f"{m} min {s} s" if m else f"{s} s"

"""What makes a plot readable: legend labels that name their keys with rounded values, error bars kept within
what a quantity can take, log axes labelled in plain numbers, metric columns in words (transfer.aggregate.plots)."""

import math

import pandas as pd
from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, MaxNLocator, NullFormatter

from transfer.aggregate.columns import RUN_METRICS, key_text


def labels(frame: pd.DataFrame, keys: list[str]) -> tuple[list[str], str]:
    """Each row's legend label, its grouping keys by name (`lr=3.8e-05 · r=16 · trial 0`; strategy by its value
    alone), and what every row shares (`strategy=lora`), said once in the title rather than in every label.

    A number gets the fewest significant figures (2 at least) that keep the rows' values apart; a key a row lacks
    (an override only some sweeps set) is left out of its label."""
    keys = [k for k in keys if k in frame]
    texts = {k: _rounded(frame[k]) for k in keys}
    varying = [k for k in keys if len(set(texts[k])) > 1] or keys[:1]
    names = _short_names(keys)
    rows = [" · ".join(_named(names[k], texts[k][i]) for k in varying if texts[k][i]) for i in range(len(frame))]
    common = " · ".join(f"{names[k]}={texts[k][0]}" for k in keys if k not in varying and texts[k][0])
    return rows, common


def _rounded(values: pd.Series) -> list[str]:
    numbers = pd.to_numeric(values, errors="coerce")
    if values.map(lambda v: isinstance(v, bool)).any() or numbers.notna().sum() < values.notna().sum():
        return [key_text(v) for v in values]  # words (a strategy, a dataset), or a column of mixed kinds
    distinct = set(numbers.dropna())
    for digits in range(2, 17):
        if len({_number(v, digits) for v in distinct}) == len(distinct):
            break
    return ["" if pd.isna(v) else _number(v, digits) for v in numbers]


def _number(value: float, digits: int) -> str:
    """Whole numbers whole (block_size=512, not 5.1e+02), others to `digits` significant figures."""
    return str(int(value)) if float(value).is_integer() else f"{value:.{digits}g}"


def _short_names(keys: list[str]) -> dict[str, str]:
    """A key by its last part (optimizer.lr -> lr, eval/probes -> probes), the whole key where two would clash."""
    short = {k: k.replace("/", ".").rsplit(".", 1)[-1] for k in keys}
    return {k: name if list(short.values()).count(name) == 1 else k for k, name in short.items()}


def _named(name: str, text: str) -> str:
    if name == "strategy" or not text:
        return text
    return f"{name} {text}" if name == "trial" else f"{name}={text}"


def bounds(col: str) -> tuple[float, float]:
    """The values a column's quantity can take: a perplexity from 1, an accuracy, AUC or share within 0 and 1, a
    perplexity change from -100 %, a time, size, count or loss from 0; anything else (a reward margin) unbounded."""
    padded = f"_{col}_"
    if col.endswith("_change_pct"):
        return -100.0, math.inf
    if "_ppl_" in padded:
        return 1.0, math.inf
    if any(f"_{m}_" in padded for m in ("accuracy", "auc", "max_predicted_share")):
        return 0.0, 1.0
    if col in RUN_METRICS or any(f"_{m}_" in padded for m in ("loss", "token_kl")):
        return 0.0, math.inf
    return -math.inf, math.inf


def bars_note(col: str, how: str = "") -> str:
    """What a plot's error bars of `col` are (`how`: more about them), and where bounds cut them."""
    low, high = bounds(col)
    cut = {(1.0, math.inf): "cut at 1, the lowest perplexity there is", (0.0, 1.0): "kept within 0 and 1",
           (0.0, math.inf): "cut at 0: it is never negative", (-100.0, math.inf): "a change never passes -100 %"}  # fmt: skip
    about = "; ".join(filter(None, (how, cut.get((low, high)))))
    return "bars: 95 % t-interval of that mean" + (f" ({about})" if about else "")


def interval(row, col: str) -> tuple[float, float]:
    """How far a row's error bar of `col` reaches below and above its mean: the 95 % t half-width, cut at bounds."""
    mean, half = float(row[col]), ci(row, col)
    low, high = bounds(col)
    return max(0.0, min(half, mean - low)), max(0.0, min(half, high - mean))


def ci(row, col: str) -> float:
    """Half-width of the 95 % t confidence interval of a row's mean; 0 where one seed gives none."""
    value = row.get(f"{col}_ci95")
    return 0.0 if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def log_axis(ax, axis: str) -> None:
    """A log scale ("x" or "y") labelled in plain numbers, set once the data is drawn: within a factor of 3, round
    ticks spaced evenly in value (5.5, 6, 6.5, 7), not matplotlib's 6×10^0 on half steps; within 30, 1, 1.5, 2, 3, 5
    and 7 of each decade; within three decades 1, 2 and 5; wider, the powers of ten."""
    (ax.set_xscale if axis == "x" else ax.set_yscale)("log")
    which = ax.xaxis if axis == "x" else ax.yaxis
    low, high = ax.get_xlim() if axis == "x" else ax.get_ylim()
    if high / low <= 3:
        ticks = MaxNLocator(nbins=6, steps=[1, 2, 2.5, 5, 10]).tick_values(low, high)
        which.set_major_locator(FixedLocator([t for t in ticks if low <= t <= high]))
    elif high / low <= 30:
        which.set_major_locator(LogLocator(subs=(1, 1.5, 2, 3, 5, 7)))
    elif high / low <= 1000:
        which.set_major_locator(LogLocator(subs=(1, 2, 5)))
    which.set_major_formatter(FuncFormatter(lambda v, _: plain(v)))
    which.set_minor_formatter(NullFormatter())


def plain(value: float) -> str:
    """A tick's number as people write it: 7, 0.25, 0.001, 20k, 1.5M; never 10^x nor 1e+05."""
    for above, unit, suffix in ((1e9, 1e9, "G"), (1e6, 1e6, "M"), (1e4, 1e3, "k")):
        if abs(value) >= above:
            return f"{value / unit:g}{suffix}"
    return f"{value:g}"


SPLITS = {"val": "validation", "ref": "probe"}


def words(col: str) -> str:
    """A metric column for people: val_ppl_after -> validation perplexity after training."""
    split, _, rest = col.partition("_")
    for short, long in (("ppl", "perplexity"), ("after", "after training"), ("before", "before training")):
        rest = rest.replace(short, long)
    return f"{SPLITS.get(split, split)} {rest.replace('_', ' ')}"

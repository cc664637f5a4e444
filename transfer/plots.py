"""The plots of a sweep's comparison, as PNG files beside its tables."""

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

MARKERS = "osD^vP*Xh<>p"


def write_plots(jobs: pd.DataFrame, table: pd.DataFrame, folder: Path) -> list[Path]:
    done = table[table["status"] == "completed"].copy()
    if done.empty:
        return []
    keys = table.attrs.get("group_keys", ["strategy"])
    done["label"] = [_label(values) for values in done[keys].itertuples(index=False)]
    paths = [
        _perplexity_vs_trainable(done, folder / "perplexity_vs_trainable.png"),
        _gain_vs_forgetting(done, folder / "gain_vs_forgetting.png"),
        _validation_curves(jobs, keys, folder / "validation_curves.png"),
        _cost(done, folder / "time_and_memory.png"),
        _task_metrics(done, folder / "task_metrics.png"),
    ]
    return [p for p in paths if p is not None]


def _label(values) -> str:
    """A row's grouping values; missing ones (an override only some sweeps set) are left out."""
    return " · ".join(str(v) for v in values if not pd.isna(v))


def _style(ax, i: int) -> dict:
    return {"marker": MARKERS[i % len(MARKERS)], "color": f"C{i % 10}"}


def _rows_with(done: pd.DataFrame, *columns: str) -> pd.DataFrame:
    """The rows that fill every one of `columns` (none when a column is missing: eval/reference=none, say)."""
    return done.dropna(subset=list(columns)) if set(columns) <= set(done.columns) else done.iloc[:0]


def _perplexity_vs_trainable(done: pd.DataFrame, path: Path) -> Path | None:
    data = _rows_with(done, "trainable_params", "val_ppl_after")
    if data.empty:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (_, row) in enumerate(data.iterrows()):
        ax.errorbar(row["trainable_params"], row["val_ppl_after"], yerr=_std(row, "val_ppl_after"),
                    linestyle="none", markersize=8, capsize=3, label=row["label"], **_style(ax, i))  # fmt: skip
    # Pareto front: no other point is both cheaper in trainable parameters and better in perplexity
    front, best = [], math.inf
    for _, row in data.sort_values(["trainable_params", "val_ppl_after"]).iterrows():
        if row["val_ppl_after"] < best:
            best = row["val_ppl_after"]
            front.append((row["trainable_params"], best))
    ax.step(*zip(*front, strict=True), where="post", color="grey", linestyle="--", linewidth=1, label="Pareto front")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel("final validation perplexity (lower is better)")
    ax.set_title("Domain perplexity against trainable parameters")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _save(fig, path)


def _gain_vs_forgetting(done: pd.DataFrame, path: Path) -> Path | None:
    data = _rows_with(done, "val_change_pct", "ref_change_pct")
    if data.empty:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (_, row) in enumerate(data.iterrows()):
        ax.errorbar(-row["val_change_pct"], row["ref_change_pct"], xerr=_std(row, "val_change_pct"),
                    yerr=_std(row, "ref_change_pct"), linestyle="none", markersize=8, capsize=3,
                    label=row["label"], **_style(ax, i))  # fmt: skip
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_xlabel("domain gain: validation perplexity drop, % (right is better)")
    ax.set_ylabel("forgetting: reference perplexity change, % (down is better)")
    ax.set_title("What a strategy gained in the domain against what it lost elsewhere")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _save(fig, path)


def _validation_curves(jobs: pd.DataFrame, keys: list[str], path: Path) -> Path | None:
    """The validation metric during training, per row: perplexity where there is one, else reward accuracy or loss."""
    done = jobs[(jobs["status"] == "completed") & jobs["validation_curve"].map(bool)]
    if done.empty:
        return None
    points = [p for curve in done["validation_curve"] for p in curve]
    metric = next((m for m in ("perplexity", "reward_accuracy", "loss") if any(m in p for p in points)), None)
    if metric is None:
        return None
    before = {
        "perplexity": "val_ppl_before",
        "reward_accuracy": "val_reward_accuracy_before",
        "loss": "val_loss_before",
    }
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (key, group) in enumerate(done.groupby(keys, dropna=False, sort=False)):
        start = [{"step": 0, metric: row[before[metric]]} for _, row in group.iterrows() if before[metric] in row]
        curve = pd.DataFrame(start + [p for c in group["validation_curve"] for p in c if metric in p])
        mean = curve.groupby("step")[metric].mean()
        label = _label(key if isinstance(key, tuple) else (key,))
        ax.plot(mean.index, mean.values, label=label, markersize=4, **_style(ax, i))
    if metric == "perplexity":
        ax.set_yscale("log")
    direction = "higher" if metric == "reward_accuracy" else "lower"
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"validation {metric.replace('_', ' ')} ({direction} is better; mean over seeds)")
    ax.set_title("Validation during training")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _save(fig, path)


def _cost(done: pd.DataFrame, path: Path) -> Path | None:
    data = _rows_with(done, "train_seconds")
    if data.empty:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.5))
    x = range(len(data))
    colors = [f"C{i % 10}" for i in x]
    left.bar(
        x, data["train_seconds"], yerr=[_std(r, "train_seconds") for _, r in data.iterrows()], color=colors, capsize=3
    )
    left.set_ylabel("training time, s")
    right.bar(x, data["peak_memory_mb"].fillna(0), yerr=[_std(r, "peak_memory_mb") for _, r in data.iterrows()],
              color=colors, capsize=3)  # fmt: skip
    right.set_ylabel("peak memory, MiB")
    for ax, title in ((left, "Training time"), (right, "Peak memory")):
        ax.set_xticks(list(x), data["label"], rotation=30, ha="right", fontsize=8)
        ax.set_title(title)
        ax.grid(True, axis="y", alpha=0.3)
    return _save(fig, path)


def _task_metrics(done: pd.DataFrame, path: Path) -> Path | None:
    """Choice scoring (AUC, accuracy) or preference (reward accuracy) before and after training, side by side per row."""
    metrics = [m for m in ("auc", "accuracy", "reward_accuracy")
               if f"val_{m}_after" in done and done[f"val_{m}_after"].notna().any()]  # fmt: skip
    if not metrics:
        return None
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4.5), squeeze=False)
    x = range(len(done))
    for ax, metric in zip(axes[0], metrics, strict=True):
        before, after = f"val_{metric}_before", f"val_{metric}_after"
        ax.bar([i - 0.2 for i in x], done[before].fillna(0), width=0.4, color="lightgrey", label="before training",
               yerr=_errors(done, before), capsize=3)  # fmt: skip
        ax.bar([i + 0.2 for i in x], done[after].fillna(0), width=0.4, color=[f"C{i % 10}" for i in x],
               label="after", yerr=_errors(done, after), capsize=3)  # fmt: skip
        if metric in ("auc", "reward_accuracy"):
            ax.axhline(0.5, color="grey", linestyle="--", linewidth=1, label="chance")
        ax.set_xticks(list(x), done["label"], rotation=30, ha="right", fontsize=8)
        name = {"auc": "AUC", "reward_accuracy": "reward accuracy"}.get(metric, metric)
        ax.set_ylabel(f"validation {name} (higher is better)")
        ax.set_ylim(0, 1)
        ax.set_title(f"Validation {name}, before and after")
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    return _save(fig, path)


def _errors(data: pd.DataFrame, col: str) -> list[float] | None:
    """Error bars of a column (the std over seeds), or none when no row has one."""
    errors = [_std(r, col) for _, r in data.iterrows()]
    return errors if any(errors) else None


def _std(row, col: str) -> float:
    value = row.get(f"{col}_std")
    return 0.0 if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

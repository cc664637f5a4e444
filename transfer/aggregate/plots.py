"""The plots of a sweep's comparison, as PNG files beside its tables.

Each says under its title what one point, line or bar is. Error bars are the 95 % Student-t confidence interval
of the mean over seeds (the table's `<m>_ci95`), cut where the quantity ends (readable.bounds: a time at 0, a
perplexity at 1, an accuracy at 0 and 1): the true mean lies within those ends, so the cut interval covers it as
often, and a reader never sees a training time of -400 s. Legends name the grouping keys with values rounded just
enough to tell the groups apart (readable.labels); log axes are labelled in plain numbers (readable.log_axis).
"""

import math
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

from transfer.aggregate.columns import (  # noqa: E402
    CHANGE_POINTS,
    benchmark_changes,
    lower_is_better,
    main_metric,
    probe_columns,
    probe_name,
)
from transfer.aggregate.readable import bars_note, interval, labels, log_axis, plain, words  # noqa: E402

MARKERS = "osD^vP*Xh<>p"


def write_plots(jobs: pd.DataFrame, table: pd.DataFrame, folder: Path) -> list[Path]:
    done = table[table["status"] == "completed"].copy()
    if done.empty:
        return []
    keys = table.attrs.get("group_keys", ["strategy"])
    done["label"], common = labels(done, keys)
    done["look"] = range(len(done))  # a group's marker and colour, the same in every plot
    done.attrs["common"] = common
    order = dict(zip(done["label"], done["look"], strict=True))
    metric = main_metric(jobs)
    paths = [
        _perplexity_vs_trainable(done, folder / "perplexity_vs_trainable.png"),
        _gain_vs_forgetting(done, table.attrs.get("probes") or {}, folder / "gain_vs_forgetting.png"),
        _with_interval(done, metric, folder / f"ci_{metric}.png"),
        _validation_curves(jobs, keys, order, folder / "validation_curves.png"),
        _cost(done, folder / "time_and_memory.png"),
        _task_metrics(done, folder / "task_metrics.png"),
        weight_change(jobs, folder, keys, order),
        search_history(jobs, metric, folder / "search_history.png"),
    ]
    return [p for p in paths if p is not None]


def _style(i: int) -> dict:
    return {"marker": MARKERS[i % len(MARKERS)], "color": f"C{i % 10}"}


def _rows_with(done: pd.DataFrame, *columns: str) -> pd.DataFrame:
    """The rows that fill every one of `columns` (none when a column is missing: eval/probes=[], say)."""
    return done.dropna(subset=list(columns)) if set(columns) <= set(done.columns) else done.iloc[:0]


def _perplexity_vs_trainable(done: pd.DataFrame, path: Path) -> Path | None:
    data = _rows_with(done, "trainable_params", "val_ppl_after")
    if data.empty:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.8))
    for _, row in data.iterrows():
        ax.errorbar(row["trainable_params"], row["val_ppl_after"], yerr=_bar(row, "val_ppl_after"),
                    linestyle="none", markersize=8, capsize=3, label=row["label"], **_style(row["look"]))  # fmt: skip
    # Pareto front: no other point is both cheaper in trainable parameters and better in perplexity
    front, best = [], math.inf
    for _, row in data.sort_values(["trainable_params", "val_ppl_after"]).iterrows():
        if row["val_ppl_after"] < best:
            best = row["val_ppl_after"]
            front.append((row["trainable_params"], best))
    front.append((data["trainable_params"].max(), best))  # on to the right edge: nothing there does better
    ax.step(*zip(*front, strict=True), where="post", color="grey", linestyle="--", linewidth=1, label="Pareto front")
    log_axis(ax, "x")
    spread = data["val_ppl_after"].max() / data["val_ppl_after"].min() > 4  # a model from scratch, say, far above
    if spread:
        log_axis(ax, "y")
    return _finished(
        fig,
        ax,
        "trainable parameters (log scale)",
        "validation perplexity after training (lower is better)" + (", log scale" if spread else ""),
        "Domain perplexity against trainable parameters",
        _caption(done, *_one(done, "point", "val_ppl_after")),
        path,
    )


SAME_GENRE = "same genre as the training data: a fall is transfer, not absence of forgetting"


def _gain_vs_forgetting(done: pd.DataFrame, probes: dict, path: Path) -> Path | None:
    """Domain gain against every forgetting probe's perplexity change and every benchmark's accuracy change, a panel
    each."""
    changes = [*probe_columns(done), *benchmark_changes(done)]
    columns = [c for c in changes if not _rows_with(done, "val_change_pct", c).empty]
    if not columns:
        return None
    rows = math.ceil(len(done) / 2) + 1  # the legend's, under each panel
    fig, axes = plt.subplots(1, len(columns), figsize=(6.5 * len(columns), 5.4 + 0.2 * rows), squeeze=False)
    for ax, column in zip(axes[0], columns, strict=True):
        _probe_panel(ax, _rows_with(done, "val_change_pct", column), column, probes.get(probe_name(column)) or {})
    title = "What each group gained in the domain against what happened on each forgetting probe and benchmark"
    return _titled(fig, title, _caption(done, *_one(done, "point", "val_change_pct")), path)


def _probe_panel(ax, data: pd.DataFrame, column: str, about: dict) -> None:
    """One probe, or one benchmark. A row whose jobs trained on the probe's genre is hollow: its probe may improve by
    transfer."""
    name = column.removesuffix(CHANGE_POINTS) if column.startswith("bench_") else probe_name(column)
    flag = f"{name}_same_genre"
    same = data[flag].eq(True) if flag in data else pd.Series(False, index=data.index)
    for index, row in data.iterrows():
        style = _style(row["look"])
        ax.errorbar(-row["val_change_pct"], row[column], xerr=_bar(row, "val_change_pct", -1), yerr=_bar(row, column),
                    linestyle="none", markersize=8, capsize=3, label=row["label"],
                    markerfacecolor="none" if same[index] else style["color"], **style)  # fmt: skip
    if same.any():
        ax.plot(
            [], [], marker="o", linestyle="none", color="grey", markerfacecolor="none", label=f"hollow: {SAME_GENRE}"
        )
    ax.axhline(0, color="grey", linewidth=0.8)
    shown = "reference corpus" if name == "ref" else name.removeprefix("ref_").removeprefix("bench_")
    ax.set_xlabel("domain gain: validation perplexity drop, % (right: the domain improved)")
    if name.startswith("bench_"):  # an accuracy: forgetting is below 0, as the perplexity's is above
        ax.set_ylabel(f"{shown} accuracy change, points\n(below 0: forgetting; above 0: the benchmark improved)")
        ax.set_title(f"benchmark: {shown}", fontsize=10)
    else:
        ax.set_ylabel(f"{shown} perplexity change, %\n(above 0: forgetting; below 0: the probe improved too)")
        details = ", ".join(str(about[k]) for k in ("genre", "format") if about.get(k))
        ax.set_title(f"probe: {shown}" + (f" ({details})" if details else ""), fontsize=10)
    ax.grid(True, alpha=0.3)
    # under the panel, where it hides no point nor interval
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)


def _with_interval(done: pd.DataFrame, metric: str, path: Path) -> Path | None:
    """The main metric per row: the mean over seeds with its 95 % t interval as error bars, n in the label."""
    data = _rows_with(done, metric)
    if data.empty:
        return None
    fig, ax = plt.subplots(figsize=(7, 2.2 + 0.45 * len(data)))
    for i, (_, row) in enumerate(data.iterrows()):
        ax.errorbar(row[metric], i, xerr=_bar(row, metric), linestyle="none", markersize=7, capsize=4,
                    **_style(row["look"]))  # fmt: skip
    texts = [
        f"{r['label']} (n = {int(r['seeds'])}{', no interval' if r['seeds'] < 2 else ''})" for _, r in data.iterrows()
    ]
    ax.set_yticks(range(len(data)), texts, fontsize=8)
    ax.invert_yaxis()  # the table's order: best first
    ax.set_xlabel(f"{words(metric)} ({'lower' if lower_is_better(metric) else 'higher'} is better)")
    caption = _caption(done, *_one(done, "row", metric, "Student t, n - 1 degrees of freedom"))
    ax.grid(True, axis="x", alpha=0.3)
    return _titled(fig, f"{words(metric).capitalize()}, per group", caption, path)


def _validation_curves(jobs: pd.DataFrame, keys: list[str], order: dict, path: Path) -> Path | None:
    """The validation metric during training, per row: perplexity where there is one, else reward accuracy or loss.

    A search's pruned trials are drawn dashed, up to the validation at which the pruner stopped them."""
    done = jobs[jobs["status"].isin(["completed", "pruned"]) & jobs["validation_curve"].map(bool)]
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
    fig, ax = plt.subplots(figsize=(7, 4.8))
    groups = list(done.groupby(keys, dropna=False, sort=False))
    names, common = labels(pd.DataFrame([k if isinstance(k, tuple) else (k,) for k, _ in groups], columns=keys), keys)
    for i, ((_, group), label) in enumerate(zip(groups, names, strict=True)):
        start = [{"step": 0, metric: row[before[metric]]} for _, row in group.iterrows() if before[metric] in row]
        curve = pd.DataFrame(start + [p for c in group["validation_curve"] for p in c if metric in p])
        mean = curve.groupby("step")[metric].mean()
        pruned = (group["status"] == "pruned").all()
        ax.plot(mean.index, mean.values, label=label + (" (pruned)" if pruned else ""), markersize=4,
                linestyle="--" if pruned else "-", **_style(order.get(label, len(order) + i)))  # fmt: skip
    if metric == "perplexity":
        log_axis(ax, "y")
    direction = "higher" if metric == "reward_accuracy" else "lower"
    single = all(len(group) == 1 for _, group in groups)
    what = _one(single, "line")[0] + ", measured at each validation (step 0: before training)"
    return _finished(
        fig,
        ax,
        "optimizer step",
        f"validation {metric.replace('_', ' ')} ({direction} is better)"
        + (", log scale" if metric == "perplexity" else ""),
        "Validation during training",
        _caption(common, what),
        path,
    )


def _cost(done: pd.DataFrame, path: Path) -> Path | None:
    data = _rows_with(done, "train_seconds")
    if data.empty:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 5))
    x = range(len(data))
    colors = [f"C{i % 10}" for i in data["look"]]
    left.bar(x, data["train_seconds"], yerr=_errors(data, "train_seconds"), color=colors, capsize=3)
    left.set_ylabel("training time, s")
    right.bar(x, data["peak_memory_mb"].fillna(0), yerr=_errors(data, "peak_memory_mb"), color=colors, capsize=3)
    right.set_ylabel("peak memory, MiB")
    for ax, title in ((left, "Training time"), (right, "Peak memory")):
        ax.set_xticks(list(x), data["label"], rotation=30, ha="right", fontsize=8)
        ax.set_title(title)
        ax.grid(True, axis="y", alpha=0.3)
    caption = _caption(done, *_one(done, "bar", "train_seconds"))
    return _titled(fig, "What the training cost", caption, path)


def _task_metrics(done: pd.DataFrame, path: Path) -> Path | None:
    """Choice scoring (AUC, accuracy, the majority class's accuracy marked) or preference (reward accuracy) before and
    after training, side by side per row."""
    metrics = [m for m in ("auc", "accuracy", "reward_accuracy")
               if f"val_{m}_after" in done and done[f"val_{m}_after"].notna().any()]  # fmt: skip
    if not metrics:
        return None
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 5), squeeze=False)
    x = range(len(done))
    for ax, metric in zip(axes[0], metrics, strict=True):
        before, after = f"val_{metric}_before", f"val_{metric}_after"
        if before in done and done[before].notna().any():  # a record may have none (measured after training only)
            ax.bar([i - 0.2 for i in x], done[before].fillna(0), width=0.4, color="lightgrey", label="before training",
                   yerr=_errors(done, before), capsize=3)  # fmt: skip
        ax.bar([i + 0.2 for i in x], done[after].fillna(0), width=0.4, color=[f"C{i % 10}" for i in done["look"]],
               label="after", yerr=_errors(done, after), capsize=3)  # fmt: skip
        if metric in ("auc", "reward_accuracy"):
            ax.axhline(0.5, color="grey", linestyle="--", linewidth=1, label="chance")
        if metric == "accuracy" and "val_majority_accuracy_after" in done:  # always the most frequent answer
            ax.hlines(done["val_majority_accuracy_after"], [i - 0.45 for i in x], [i + 0.45 for i in x], colors="black",
                      linestyles="--", linewidth=1, label="majority class")  # fmt: skip
        ax.set_xticks(list(x), done["label"], rotation=30, ha="right", fontsize=8)
        name = {"auc": "AUC", "reward_accuracy": "reward accuracy"}.get(metric, metric)
        ax.set_ylabel(f"validation {name} (higher is better)")
        ax.set_ylim(0, 1)
        ax.set_title(f"Validation {name}, before and after")
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    caption = _caption(done, *_one(done, "bar", "val_accuracy_after"))
    return _titled(fig, "The task, before and after", caption, path)


def _bar(row, col: str, sign: int = 1) -> list[list[float]] | None:
    """A point's error bar as errorbar takes it, none without an interval (one seed: no cross drawn through the
    marker); sign -1 for an axis that shows -col (the gain, -change)."""
    below, above = interval(row, col)
    if not (below or above):
        return None
    return [[below], [above]] if sign > 0 else [[above], [below]]


def _errors(data: pd.DataFrame, col: str) -> list[list[float]] | None:
    """The error bars of a column's bars (below, above), or none when no row has one."""
    reach = [interval(r, col) if pd.notna(r[col]) else (0.0, 0.0) for _, r in data.iterrows()]
    return [list(side) for side in zip(*reach, strict=True)] if any(b or a for b, a in reach) else None


def _one(rows: pd.DataFrame | bool, thing: str, col: str | None = None, how: str = "") -> list[str]:
    """What one point (`thing`) of a plot is, and its error bars of `col`: `rows` (the groups drawn, or whether each
    group is a single job) say whether the groups are means over seeds or single jobs, which have no interval."""
    single = rows if isinstance(rows, bool) else bool((rows["seeds"] <= 1).all())
    if single:
        return [f"one {thing}: a job (one seed each, so no interval)" if col else f"one {thing}: a job"]
    return [f"one {thing}: a group of jobs that differ only by seed, the mean over its seeds"] + (
        [bars_note(col, how)] if col else []
    )


def _caption(common, *parts: str) -> str:
    """What one point is, and what every group shares (a frame's attrs["common"] or the text itself)."""
    shared = common.attrs.get("common", "") if isinstance(common, pd.DataFrame) else common
    return "; ".join(parts) + (f". Same in all: {shared}" if shared else "")


def _finished(fig, ax, xlabel: str, ylabel: str, title: str, caption: str, path: Path) -> Path:
    """A one-panel plot's labels, grid, legend and title with its caption; then saved."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _titled(fig, title, caption, path)


def _titled(fig, title: str, caption: str, path: Path) -> Path:
    """The title, and under it the caption in lines as wide as the figure (about 12 characters an inch at 10 pt)."""
    fig.suptitle(f"{title}\n{textwrap.fill(caption, int(fig.get_figwidth() * 12))}", fontsize=10)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def weight_change(jobs: pd.DataFrame, folder: Path, keys: list[str] | None = None, order: dict | None = None):
    """weight_change.png: each block's relative weight change ||ΔW||/||W|| against its index, a line per group
    (`keys`, strategy by default), the mean over its seeds, in the colour `order` gives its label; None when no
    completed job recorded one."""
    keys = list(keys or ["strategy"])
    if "weight_change" not in jobs:  # tables of sweeps from before the diagnostics
        return None
    done = jobs[(jobs["status"] == "completed") & jobs["weight_change"].map(lambda v: isinstance(v, list) and bool(v))]
    if done.empty:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.8))
    smallest, frozen = math.inf, False
    groups = list(done.groupby(keys, dropna=False, sort=False))
    names, common = labels(pd.DataFrame([k if isinstance(k, tuple) else (k,) for k, _ in groups], columns=keys), keys)
    for i, ((_, group), label) in enumerate(zip(groups, names, strict=True)):
        mean = pd.DataFrame(group["weight_change"].tolist(), dtype=float).mean()  # per block, over seeds
        smallest = min([smallest, *mean[mean > 0]])
        ax.plot(mean.index, mean.values, label=label, markersize=5, **_style((order or {}).get(label, i)))
        frozen = frozen or bool((mean == 0).any())
    what = _one(all(len(group) == 1 for _, group in groups), "line")[0]
    if (
        frozen
    ):  # log from the decade of the smallest change, linear below it: frozen blocks (exactly 0) stay on the plot
        ax.set_yscale("symlog", linthresh=10 ** math.floor(math.log10(smallest)) if math.isfinite(smallest) else 1e-6)
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: plain(v)))
        what += "; log scale above the smallest change's decade, linear below it, where 0 is a frozen block"
    else:
        log_axis(ax, "y")
    ax.xaxis.get_major_locator().set_params(integer=True)
    return _finished(
        fig,
        ax,
        "decoder block (0: nearest the embeddings)",
        "relative weight change ||ΔW||_F / ||W||_F",
        "How much training moved each block",
        _caption(common, what),
        folder / "weight_change.png",
    )


def search_history(jobs: pd.DataFrame, metric: str, path: Path) -> Path | None:
    """search_history.png, for an Optuna search: each trial's `metric` in the order the study ran them, the best so far
    as a step line; a pruned trial is a cross at its last validation. None outside a search."""
    if "search.trial" not in jobs or metric not in jobs:
        return None
    trials = jobs[jobs["status"].isin(["completed", "pruned"]) & jobs["search.trial"].notna() & jobs[metric].notna()]
    if trials.empty:
        return None
    trials = trials.sort_values("search.trial")
    lower = lower_is_better(metric)
    fig, ax = plt.subplots(figsize=(7, 4.8))
    completed, pruned = (trials[trials["status"] == status] for status in ("completed", "pruned"))
    for some, marker, label, color in ((completed, "o", "completed", "C0"),
                                       (pruned, "x", "pruned (its last validation)", "C3")):  # fmt: skip
        if not some.empty:
            ax.scatter(some["search.trial"], some[metric], marker=marker, s=40, label=label, color=color)
    if not completed.empty:
        best = completed[metric].cummin() if lower else completed[metric].cummax()
        ax.step(completed["search.trial"], best, where="post", color="grey", label="best so far")
    ax.xaxis.get_major_locator().set_params(integer=True)
    return _finished(
        fig,
        ax,
        "trial (the order the study ran them)",
        f"{words(metric)} ({'lower' if lower else 'higher'} is better)",
        "The search: each trial's result, and the best so far",
        "one point: a trial (one job)",
        path,
    )

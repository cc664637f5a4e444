"""Views that compare groups of a sweep's comparison table: paired differences from a baseline group
(`--baseline`, seed by seed, a t interval and a paired t-test) and the best group per strategy
(`--best-per`, chosen on validation, reported on test). transfer.aggregate.tables makes the table.
"""

import pandas as pd

from transfer.aggregate.columns import (
    CHANGE_POINTS,
    CHANGE_POINTS_STDERR,
    benchmark_changes,
    default_sort,
    formatter,
    key_text,
    lower_is_better,
    main_metric,
    probe_columns,
)
from transfer.aggregate.stats import paired_t_test
from transfer.aggregate.tables import CI_NOTE, for_people, shown_columns
from transfer.errors import TransferError


def main_metrics(jobs: pd.DataFrame) -> list[str]:
    """What the paired table compares: the main validation metric and its test counterpart, validation and
    test perplexity after training, every forgetting probe's change and every benchmark's change of accuracy in
    points (higher is better, as an accuracy); those some completed job fills.
    """
    select = main_metric(jobs)
    forgetting = [*probe_columns(jobs), *benchmark_changes(jobs)]
    wanted = [select, select.replace("val_", "test_", 1), "val_ppl_after", "test_ppl_after", *forgetting]
    done = jobs[jobs["status"] == "completed"]
    return [c for c in dict.fromkeys(wanted) if c in done and pd.to_numeric(done[c], errors="coerce").notna().any()]


def paired(jobs: pd.DataFrame, table: pd.DataFrame, baseline: str) -> pd.DataFrame:
    """Each completed group's differences from the baseline group (`key=value`), paired by seed.

    With more grouping keys than the baseline's, a group is paired with the baseline group that shares
    its other keys (lora at lr 1e-4 with full at lr 1e-4). Per metric m: `m_n` pairs, `m_diff` the mean
    of (group - baseline), `m_ci95` the half-width of its 95 % t interval, `m_p` the paired t-test's p.
    """
    keys = table.attrs.get("group_keys") or []
    done = jobs[jobs["status"] == "completed"]
    key, value = parse_baseline(baseline, keys, done)
    at = keys.index(key)
    groups = {_group_id(k): g for k, g in done.groupby(keys, dropna=False, sort=False)}
    bases = {gid[:at] + gid[at + 1 :]: g for gid, g in groups.items() if _matches(g[key].iloc[0], value)}
    metrics = main_metrics(jobs)
    order = [_group_id(v) for v in table.loc[table["status"] == "completed", keys].itertuples(index=False)]
    missing = f"no {key}={value} group with the same {', '.join(keys[:at] + keys[at + 1 :])}"
    rows = []
    for gid in dict.fromkeys(order):
        group = groups.get(gid)
        if group is not None and not _matches(group[key].iloc[0], value):
            base = bases.get(gid[:at] + gid[at + 1 :])
            rows.append({k: group[k].iloc[0] for k in keys} | _paired_row(group, base, metrics, missing))
    out = pd.DataFrame(rows, columns=[*keys, "pairs", "note"] if not rows else None)
    out.attrs.update(group_keys=keys, metrics=metrics, baseline=f"{key}={value}")
    return out


def _paired_row(group: pd.DataFrame, base: pd.DataFrame | None, metrics: list[str], missing: str) -> dict:
    if base is None:
        return {"pairs": 0, "note": missing} | {f"{m}_n": 0 for m in metrics}
    row = {"pairs": len(_per_seed(group, None).index.intersection(_per_seed(base, None).index)), "note": None}
    for m in metrics:
        test = paired_t_test(_differences(group, base, m))
        row.update({f"{m}_n": test.n, f"{m}_diff": test.mean, f"{m}_ci95": test.half_width, f"{m}_p": test.p})
    return row


def parse_baseline(text: str, keys: list[str], done: pd.DataFrame) -> tuple[str, str]:
    """`key=value` of a grouping key and a value some completed group has; else one line with the allowed ones."""
    key, sep, value = text.partition("=")
    if not sep or key not in keys:
        allowed = "; ".join(f"{k}={'|'.join(_values(done, k))}" for k in keys)
        raise TransferError(f"--baseline {text!r}: {key!r} is not a grouping key; allowed: {allowed}")
    if not any(_matches(v, value) for v in done[key].drop_duplicates()):
        raise TransferError(
            f"--baseline {text!r}: no completed group has {key}={value}; allowed values: {', '.join(_values(done, key))}"
        )
    return key, value


def _values(done: pd.DataFrame, key: str) -> list[str]:
    return [str(v) for v in done[key].drop_duplicates()] if key in done else []


def _matches(cell, text: str) -> bool:
    """A table value against the text of --baseline: 1e-4 names 0.0001, true names True."""
    if str(cell) == text or str(cell).lower() == text.lower():
        return True
    try:
        return float(cell) == float(text)
    except (TypeError, ValueError):
        return False


def _group_id(values) -> tuple:
    return tuple(str(v) for v in values)  # NaN and None group alike, as groupby(dropna=False) does


def _per_seed(group: pd.DataFrame, metric: str | None) -> pd.Series:
    """A group's values by seed (the mean, where one seed ran twice); the seeds that completed for metric None."""
    if metric is None:
        return group.groupby("seed")["status"].size()
    return pd.to_numeric(group[metric], errors="coerce").groupby(group["seed"]).mean().dropna()


def _differences(group: pd.DataFrame, base: pd.DataFrame, metric: str) -> list[float]:
    mine, theirs = _per_seed(group, metric), _per_seed(base, metric)
    common = mine.index.intersection(theirs.index)
    return [float(mine[s] - theirs[s]) for s in sorted(common)]


def paired_for_people(numbers: pd.DataFrame) -> pd.DataFrame:
    """The paired differences as cells: Δ ± half-width, p; `n.s.` where the interval contains 0."""
    keys, metrics = numbers.attrs["group_keys"], numbers.attrs["metrics"]
    out = pd.DataFrame({k: numbers[k].map(key_text) for k in [*keys, "pairs"]}, index=numbers.index)
    for m in metrics:
        out[f"Δ {m}"] = [_paired_cell(r, m) for _, r in numbers.iterrows()]
    if numbers["note"].notna().any():
        out["note"] = numbers["note"].fillna("")
    return out


def paired_note(numbers: pd.DataFrame) -> str:
    return (
        f"Δ: this row minus {numbers.attrs['baseline']}, seed by seed, over the seeds both completed (pairs); "
        "± is the half-width of the 95 % t interval of the mean difference; p: two-sided paired t-test; "
        "n.s.: not significant, the interval contains 0 (p ≥ 0.05). A change_pct's Δ is in percentage points, a "
        "benchmark's change_points' in points of accuracy."
    )


def _paired_cell(row: pd.Series, m: str) -> str:
    n = int(row[f"{m}_n"])
    if n == 0:
        return "no common seed"
    diff, half, p = row[f"{m}_diff"], row[f"{m}_ci95"], row[f"{m}_p"]
    fmt = formatter(m.replace("change_", ""))
    signed = lambda v: ("+" if v > 0 else "") + fmt(v)  # noqa: E731
    if n == 1:
        return f"{signed(diff)} (1 pair: too few for an interval or a test)"
    shown = "p < 0.001" if p < 0.001 else f"p = {p:.2g}"
    cell = f"{signed(diff)} ± {fmt(half)}, {shown}" + (" n.s." if p >= 0.05 else "")
    return cell + (f" (n = {n})" if n != row["pairs"] else "")


# Grouping keys that are not hyper-parameters: best-per-strategy never picks among models, data or evaluations.
NOT_HYPERPARAMETERS = ("strategy", "model", "dataset", "val_tokens")


def varies_hyperparameters(table: pd.DataFrame) -> bool:
    """Whether the table groups by strategy and some hyper-parameter besides it (and seed)."""
    keys = table.attrs.get("group_keys") or []
    others = [k for k in keys if k not in NOT_HYPERPARAMETERS and not k.startswith(("model.", "dataset.", "eval."))]
    return "strategy" in keys and bool(others)


def best_per(jobs: pd.DataFrame, table: pd.DataFrame, key: str) -> pd.DataFrame:
    """Per value of `key`, the completed group with the best mean validation metric (default_sort's), never test.

    `picked` names its other grouping keys' values, `candidates` how many groups it was chosen from.
    """
    keys = table.attrs.get("group_keys") or []
    if key not in keys:
        raise TransferError(f"--best-per {key!r} is not a grouping key; allowed: {', '.join(keys)}")
    metric = default_sort(jobs)
    done = table[table["status"].eq("completed") & table[metric].notna()] if metric in table else table.iloc[:0]
    if done.empty:
        raise TransferError(f"--best-per {key}: no completed group has the validation metric {metric!r} to select by")
    others = [k for k in keys if k != key]
    rows = []
    for _, group in done.groupby(key, dropna=False, sort=False):
        best = group.sort_values(metric, ascending=lower_is_better(metric), kind="stable").iloc[0].to_dict()
        # a key whose value no record of the group holds (an earlier version's config lacks it; a preset the
        # jobs were not given) ran with its configured default; every other value is the one the jobs ran with
        picked = ", ".join(f"{k}={'(default)' if pd.isna(best[k]) else key_text(best[k])}" for k in others)
        rows.append({**best, "picked": picked or "(nothing else varies)", "candidates": len(group)})
    out = pd.DataFrame(rows).sort_values(metric, ascending=lower_is_better(metric), kind="stable")
    out = out.reset_index(drop=True)
    filled = [c for c in shown_columns(out) if out[c].notna().any()]
    tests = [c for c in filled if c.startswith("test_") and c.endswith("_after")]
    # a benchmark's change with its paired standard error beside it, as the comparison table shows them
    benches = [b for c in benchmark_changes(out) for b in (c, c.removesuffix(CHANGE_POINTS) + CHANGE_POINTS_STDERR)]
    probes = [c for c in [*probe_columns(out), *benches] if c in filled]
    judged = [c for c in dict.fromkeys([metric, main_metric(jobs)]) if c in filled]  # loss selects; perplexity too
    out.attrs.update(
        group_keys=[key], select=metric, shown=[key, "picked", "candidates", "seeds", *judged, *tests, *probes]
    )
    return out


def best_note(numbers: pd.DataFrame) -> str:
    metric = numbers.attrs["select"]
    return (
        f"Per {numbers.attrs['group_keys'][0]}, the group with the best mean {metric} "
        f"({'lowest' if lower_is_better(metric) else 'highest'}) among `candidates` groups; the test columns are "
        f"that group's, never selected on. {CI_NOTE}"
    )


def extra_tables(jobs: pd.DataFrame, table: pd.DataFrame, baseline: str | None = None, best: str | None = None) -> dict:
    """name -> (numbers, cells, note): the paired differences if a baseline is given; best-per-`best` if asked,
    best-per-strategy when the sweep varies a hyper-parameter besides strategy and seed.
    """
    extras = {}
    if baseline:
        numbers = paired(jobs, table, baseline)
        extras["paired"] = (numbers, paired_for_people(numbers), paired_note(numbers))
    if best is None and varies_hyperparameters(table) and default_sort(jobs) in table:
        best = "strategy" if table.loc[table["status"].eq("completed"), default_sort(jobs)].notna().any() else None
    if best:
        numbers = best_per(jobs, table, best)
        extras[f"best_per_{best}"] = (numbers, for_people(numbers, numbers.attrs["shown"]), best_note(numbers))
    return extras

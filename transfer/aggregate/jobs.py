"""Reading a sweep's records into the jobs frame: one row per job folder of `multirun/<date>/<time>/<job>/`.

A row holds the job's settings, then what its `metrics.json` says. The settings are the keys that some job read was
given, each with the value this job ran with however it was given: a config group's choice (strategy=lora), else the
record's resolved config (block_size set by a preset `+experiment=...`; optimizer.lr as the rate used, which a
strategy's file gives where optimizer.lr is null), else the override itself (a preset's name; a record without
config). Two spellings of the same settings so read alike; `overrides` keeps what the job was given, as a command
line, and `config_id` which jobs ran the same config but for the seed (tables.default_group_keys). Failed jobs and
folders without a finished record stay, with their status; nothing is dropped silently. A record that says finished without what a
finished job writes is `unreadable`; a job that ran the config and seed of another (a copied folder, a sweep run
twice) is `duplicate` and counted once; a metric that is no number is left out. The last two become notes
(`frame.attrs["notes"]`), said under the tables and on the terminal. Trials that an Optuna search pruned show as
`pruned`, with the metrics they had when they stopped.
"""

import functools
import hashlib
import json
import re
import reprlib
import shlex
from pathlib import Path

import pandas as pd
import yaml

from transfer.aggregate.columns import NOT_METRICS, SPLIT_SHORT, column, numeric
from transfer.config.optimizer import learning_rate
from transfer.errors import TransferError
from transfer.record import FINISHED, RECORD_NAME, job_folders, lookup, missing_fields, read_record

_MISSING = object()  # a key a config lacks, apart from one set to null
DEFAULT_ROOT = Path("multirun")
TABLES = "tables"  # where an aggregation writes: a sweep's tables/, --all's <root>/tables/; never a sweep
SWEEP_DEPTH = 3  # multirun/<date>/<time>, and a hydra.sweep.dir a level or two down


def find_sweeps(paths: list[str], all_sweeps: bool, root: Path = DEFAULT_ROOT) -> list[Path]:
    """The sweep folders to read: those given, every one under root, or the newest (by its records, oldest first)."""
    if paths:
        sweeps = [Path(p) for p in paths]
        for s in sweeps:
            if s.is_file():
                raise TransferError(
                    f"{str(s)!r} is a file; allowed: a sweep folder (multirun/<date>/<time>), which holds the jobs' folders"
                )
            if not s.is_dir():
                raise TransferError(f"sweep folder {str(s)!r} does not exist")
        return sweeps
    found = sorted(sweeps_under(root), key=lambda s: (_last_written(s), str(s)))
    if not found:
        raise TransferError(
            f"no sweep under {str(root)!r}; run a sweep first (python -m transfer -m ...) or name a folder"
        )
    return found if all_sweeps else found[-1:]


def sweeps_under(folder: Path, depth: int = SWEEP_DEPTH) -> list[Path]:
    """The folders under `folder` that hold job folders (multirun/<date>/<time>, multirun/<name> of a
    hydra.sweep.dir=multirun/<name>), never a sweep's own folders nor a tables/ folder."""
    if depth == 0 or not folder.is_dir():
        return []
    found = []
    for sub in sorted(folder.iterdir()):
        if not sub.is_dir() or sub.name.startswith(".") or sub.name == TABLES:
            continue
        found += [sub] if job_folders(sub) else sweeps_under(sub, depth - 1)
    return found


def _last_written(sweep: Path) -> float:
    """When a job of the sweep last wrote its record (or, without one, its folder was made)."""
    times = [0.0]
    for job in job_folders(sweep):
        record = job / RECORD_NAME
        times.append((record if record.is_file() else job).stat().st_mtime)
    return max(times)


def comparable_sets(jobs: pd.DataFrame) -> dict[str, list[str]]:
    """The sweeps of a jobs frame by what they measure, kind -> sweeps: one table never mixes two kinds.

    A sweep's kind is its finished jobs' objectives and datasets (the metrics of an lm sweep on rust_concepts and of
    an sft one on movielens are not one quantity), and whether they were dry runs (counts, no metrics); a sweep
    with no finished job is its own kind, its failures listed apart.
    """
    done = jobs[jobs["status"].isin(FINISHED)]
    kinds: dict[str, list[str]] = {}
    for sweep in dict.fromkeys(jobs["sweep"]):
        mine = done[done["sweep"] == sweep]
        measures = sorted(
            {
                f"{_text(row.get('objective'), 'lm')} on {_text(row.get('dataset'), '?')}"
                + (" (dry run)" if row["status"] == "dry_run" else "")
                for _, row in mine.iterrows()
            }
        )
        kind = " + ".join(measures) if measures else f"no finished job ({sweep})"
        kinds.setdefault(kind, []).append(sweep)
    return kinds


def _text(value, missing: str) -> str:
    """A frame's cell as text; `missing` for none (an earlier version's record names no objective: it was lm)."""
    return missing if value is None or pd.isna(value) else str(value)


def kind_folder(kind: str) -> str:
    """A kind of comparable_sets as a folder name: `lm on rust_concepts` -> lm-rust_concepts."""
    return re.sub(r"[^A-Za-z0-9_.+-]+", "-", kind.replace(" on ", "-")).strip("-")


def read_jobs(sweeps: list[Path]) -> pd.DataFrame:
    """One row per job of every sweep: the settings some job was given first (each job's value), then the
    record's numbers."""
    rows = [job_row(sweep, job) for sweep in sweeps for job in job_folders(sweep)]
    if not rows:
        raise TransferError(f"no job folders in {', '.join(str(s) for s in sweeps)}; is it a sweep folder?")
    probes = {}
    for row in rows:  # what each probe is, for the plots' labels: the first record that says wins
        for name, about in (row.pop("_probes", None) or {}).items():
            probes.setdefault(name, about)
    # what the tables leave out or count once, said under them and on the terminal (main, TablesCallback)
    notes = [note for row in rows for note in row.pop("_notes", [])] + mark_duplicates(rows)
    # every key some job was given, for every job: a setting one sweep spelt out and another took from a preset or
    # a default has its value in each row, and groups alike
    keys = list(dict.fromkeys(k for row in rows for k in row["_given"]))
    held = set()  # the keys some record's config or choices hold: settings, not a preset's name
    for row in rows:
        given, config, choices = row.pop("_given"), row.pop("_config"), row.pop("_choices")
        held.update(k for k in keys if _held(k, config, choices))
        for key in keys:
            if row.get(key) is None:  # the record's own columns (strategy, model, seed) stand
                row[key] = _setting(key, config, choices, given.get(key))
    frame = pd.DataFrame(rows)
    frame.attrs["override_keys"] = keys
    frame.attrs["presets"] = [k for k in keys if k not in held]
    frame.attrs["probes"] = probes
    frame.attrs["notes"] = notes
    # the settings first, in the order they were given, then how each job was given them
    first = ["sweep", "job", *[k for k in keys if k not in ("sweep", "job", "overrides")], "overrides"]
    return frame[[*first, *[c for c in frame.columns if c not in first]]]


def job_row(sweep: Path, job: Path) -> dict:
    try:
        record = read_record(job)
    except ValueError as e:  # not JSON: the job stays in the table, marked, and the others are read
        record = {"status": "unreadable", "error": f"metrics.json is unreadable ({str(e).splitlines()[0]})"}
    row = _job_record_row(sweep, job, record)
    # The overrides the job ran with, as its record keeps them: Hydra rewrites .hydra/overrides.yaml
    # whenever a sweep is launched again over the folder, even for jobs it then skips.
    given = (record.get("overrides") if record and "overrides" in record else _hydra_overrides(job)) or []
    given = [o for o in given if isinstance(o, str) and not o.lstrip("+~").startswith("hydra")]
    row["overrides"] = shlex.join(given)
    row["_given"] = _overrides(given)
    # an unreadable record's config may be as damaged as the rest: its overrides say what it was given
    usable = record is not None and row["status"] != "unreadable"
    config, choices = (record.get("config"), record.get("choices")) if usable else (None, None)
    row["_config"] = _ran_with(config) if isinstance(config, dict) else {}
    row["_choices"] = choices if isinstance(choices, dict) else {}
    row["config_id"] = _config_id(row["_config"])
    return row


def _job_record_row(sweep: Path, job: Path, record: dict | None) -> dict:
    row = {"sweep": str(sweep), "job": job.name}
    if record is not None and record.get("status") == "unreadable":
        return {**row, **record, **_choices(job, None)}
    if record is None or record.get("status") in (None, "running"):
        row.update(status="incomplete", error="no finished record (killed or still running)")
        return {**row, **_choices(job, record)}
    missing = missing_fields(record)
    if missing:  # says it finished, holds nothing a finished job writes: not a result to count
        row.update(status="unreadable", error=f"metrics.json says {record['status']} but has no {', '.join(missing)}")
        return {**row, **_choices(job, None)}  # from Hydra's files: the record's may be as damaged as the rest
    cfg = record.get("config", {})
    params = record.get("params", {})
    train = record.get("train", {})
    ev = record.get("eval", {})
    row.update(_choices(job, record))
    row.update(
        seed=cfg.get("seed"),
        status=record.get("status"),
        error=record.get("error"),
        tied_embeddings=params.get("tied_embeddings"),
        trainable_params=params.get("trainable"),
        total_params=params.get("total"),
        trainable_pct=params.get("trainable_pct"),
        train_seconds=train.get("seconds"),
        warmup_seconds=train.get("warmup_seconds"),  # of train_seconds: first steps, compiling included
        tokens_per_second=train.get("tokens_per_second"),
        # without each process's first step: the pace a compiled run keeps once compiled
        steady_tokens_per_second=train.get("tokens_per_second_after_first_step"),
        contended=(train.get("machine") or {}).get("contended"),  # the run shared the CPUs: its speed says less
        samples_per_second=train.get("samples_per_second"),
        steps=train.get("steps"),
        best_step=train.get("best_step"),
        stop_reason=train.get("stop_reason"),
        objective=(record.get("objective") or {}).get("name"),
        select=(record.get("objective") or {}).get("select"),
        peak_memory_mb=_mb(record.get("memory", {}).get("bytes")),
        estimated_peak_mb=_mb((record.get("memory_estimate") or {}).get("peak_bytes")),
        checkpoint_mb=_mb((train.get("checkpoint") or {}).get("bytes")),
        val_tokens=(record.get("data") or {}).get("validation", {}).get("tokens"),  # eval.max_tokens cuts it
    )
    row.update(eval_columns(ev))
    row.update(same_genre_columns(ev.get("probes")))
    row["_probes"] = ev.get("probes") or {}
    row["validation_curve"] = train.get("validation_curve") or []
    row["weight_change"] = lookup(record, "diagnostics.weight_change.blocks") or []  # per block, like the curve a list
    if record.get("status") == "pruned" and not (ev.get("final") or {}).get("validation") and row["validation_curve"]:
        # stopped before its final evaluation: its last validation is what it reached
        last = row["validation_curve"][-1]
        row.update({column("validation", k, "after"): v for k, v in last.items()
                    if k != "step" and k not in NOT_METRICS and isinstance(v, (int, float))})  # fmt: skip
    row["_notes"] = _drop_non_numbers(row, job)
    # what makes two jobs one result: their config groups and whole config, seed included (resume=true continues
    # the same run)
    same = [record.get("choices"), {k: v for k, v in cfg.items() if k != "resume"}]
    row["_same_as"] = json.dumps(same, sort_keys=True, default=str)
    return row


def _drop_non_numbers(row: dict, job: Path) -> list[str]:
    """A metric the record holds as text, a list or true/false is left out of the averages: one note for each."""
    notes = []
    for col, value in row.items():
        if (
            (numeric(col) or col == "val_tokens")
            and value is not None
            and (isinstance(value, bool) or not isinstance(value, (int, float)))
        ):
            row[col] = None
            notes.append(f"{job}: {col} is {reprlib.repr(value)} in its record, not a number; left out")
    return notes


def mark_duplicates(rows: list[dict]) -> list[str]:
    """Jobs that ran the config and seed of an earlier job (a copied folder, a sweep run twice) are marked `duplicate`:
    the first one counts, and one seed is never averaged as two. A note names each pair of folders."""
    first, notes = {}, []
    for row in rows:
        key = row.pop("_same_as", None)
        if key is None or row.get("status") not in FINISHED:
            continue
        folder = Path(row["sweep"]) / row["job"]
        if key not in first:
            first[key] = folder
            continue
        same = f"the same config and seed ({row.get('seed')}) as {first[key]}"
        row.update(status="duplicate", error=f"{same}; counted there")
        notes.append(f"{folder} ran {same}: counted once, not as a second seed")
    return notes


def eval_columns(ev: dict) -> dict:
    """Every metric of every split, before and after, as the record names them (no fixed list)."""
    columns = {}
    for when, suffix in (("baseline", "before"), ("final", "after")):
        for split, result in (ev.get(when) or {}).items():
            for metric, value in (result or {}).items():
                # a value that is no number is left out with a note (_drop_non_numbers); a choice's own numbers
                # (constant_accuracy, predicted_share: {choice: value}) stay in the record, their largest in the tables
                if metric not in NOT_METRICS and not isinstance(value, dict):
                    columns[column(split, metric, suffix)] = value
    for split, value in (ev.get("change_pct") or {}).items():
        columns[f"{SPLIT_SHORT.get(split, split)}_change_pct"] = value
    return columns


def same_genre_columns(probes: dict | None) -> dict:
    """`<probe>_same_genre`: whether a probe shares the training data's genre (its fall is transfer, not no forgetting).

    Per job, not per sweep: a sweep over datasets can train on a probe's genre in some jobs only.
    """
    return {
        f"{name}_same_genre": bool((about or {}).get("same_genre_as_training"))
        for name, about in (probes or {}).items()
    }


def _setting(key: str, config: dict, choices: dict, text: str | None):
    """What a job ran with for `key`: a config group's choice (strategy=lora, eval/probes=[...]), else the value in
    its resolved config (1e-4 and 0.0001, true and True are one value), else the override's own value (a preset's
    name, +experiment=qwen_strategies; a record without config); None where nothing says."""
    choice = choices.get(_CHOICE_OF.get(key, key))
    if choice is not None:
        return choice
    node = lookup(config, key, missing=_MISSING)
    if node is _MISSING:
        return None if text is None else _typed(key, text)
    return node if isinstance(node, (str, int, float, bool)) or node is None else str(node)


def _held(key: str, config: dict, choices: dict) -> bool:
    return choices.get(_CHOICE_OF.get(key, key)) is not None or lookup(config, key, missing=_MISSING) is not _MISSING


_CHOICE_OF = {"eval/probes": "probes"}  # a list group: its choice is recorded under its own name (transfer.cli)


def _ran_with(config: dict) -> dict:
    """The record's config with optimizer.lr the rate the run used: null there means the strategy's strategy.lr
    (transfer.config.optimizer.learning_rate), so `strategy=lora` and `strategy=lora optimizer.lr=<lora's rate>` ran
    the same training and read alike."""
    optimizer, strategy = config.get("optimizer"), config.get("strategy")
    if not (isinstance(optimizer, dict) and isinstance(strategy, dict) and "lr" in strategy):
        return config
    return {**config, "optimizer": {**optimizer, "lr": learning_rate(config)[0]}}


def _config_id(config: dict) -> str | None:
    """Which config a job ran, but for its seed: the same for two jobs that differ only in how they were given it
    (tables.default_group_keys groups by no preset that tells apart no other settings); None without a config."""
    if not config:
        return None
    same = {k: v for k, v in config.items() if k not in ("seed", "resume")}
    if isinstance(same.get("strategy"), dict):  # unused once the rate is optimizer.lr (_ran_with)
        same["strategy"] = {k: v for k, v in same["strategy"].items() if k != "lr"}
    return hashlib.sha1(json.dumps(same, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _typed(key: str, text: str):
    """An override's value as Hydra reads it (1e-3 a number, true a boolean, null None; a list written as a config's
    list is, `['q', 'v']`); the text itself where Hydra reads no single value (a sweep, a typo)."""
    parser, error = _override_parser()
    try:
        value = parser.parse_override(f"{key}={text}").value()
    except error:
        return text
    if isinstance(value, (list, dict)):
        return str(value)
    return value if isinstance(value, (str, int, float, bool)) or value is None else text


@functools.cache
def _override_parser():
    # imported only for a job whose record lacks a key it was given: Hydra's parser takes a third of a second
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    return OverridesParser.create(), HydraException


def _hydra_overrides(job: Path) -> list[str]:
    path = job / ".hydra" / "overrides.yaml"
    try:
        return (yaml.safe_load(path.read_text()) if path.is_file() else None) or []
    except (OSError, yaml.YAMLError):
        return []


def _overrides(items: list[str]) -> dict:
    """key -> value text of a job's overrides (Hydra's own left out by the caller), the key without `+`, `++`, `~`."""
    pairs = (o.split("=", 1) for o in items if "=" in o)
    return {k.lstrip("+~"): v for k, v in pairs}


def _choices(job: Path, record: dict | None) -> dict:
    """strategy, model, dataset: from the record, or from Hydra's files for a job without one."""
    if record and record.get("choices"):
        c = record["choices"]
        path = (record.get("config", {}).get("model") or {}).get("name_or_path")
        model = Path(path).name if path else c.get("model")
        return {"strategy": c.get("strategy"), "model": model, "dataset": c.get("dataset")}
    hydra_file = job / ".hydra" / "hydra.yaml"
    if not hydra_file.is_file():
        return {}
    choices = (yaml.safe_load(hydra_file.read_text()) or {}).get("hydra", {}).get("runtime", {}).get("choices", {})
    return {g: choices.get(g) for g in ("strategy", "model", "dataset")}


def _mb(n) -> float | None:
    return n / 2**20 if isinstance(n, (int, float)) else None

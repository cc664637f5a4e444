"""The run record: `metrics.json` in the run's folder, always valid JSON on disk."""

import json
import math
import os
import tempfile
from pathlib import Path

from transfer.errors import TransferError, first_line

RECORD_NAME = "metrics.json"
# a run that trained to its end, or that a search (hydra/sweeper=optuna) stopped early as it may
TRAINED = ("completed", "pruned")
# how a job may end well, and records that hold numbers: those, or a dry run's counts
FINISHED = (*TRAINED, "dry_run")


def write_record(folder: Path, record: dict) -> Path:
    """Write atomically (write_atomically): a reader never sees half a record, and a failed write keeps the last."""
    path = folder / RECORD_NAME
    try:
        folder.mkdir(parents=True, exist_ok=True)
        write_atomically(path, lambda f: f.write(json.dumps(_finite(record), indent=2, allow_nan=False).encode()))
    except OSError as e:
        raise TransferError(
            f"cannot write the record {path} ({e.strerror}); free space there, or choose another output folder"
        ) from None
    return path


def write_atomically(path: Path, write) -> None:
    """`write(file)` into a temporary file of this writer's own beside `path` (binary), made durable, then renamed onto
    it: a reader sees the whole file or the one before, writers of one file never share a temporary one, and a
    failed write leaves none. Readable by all, as whatever a job writes: others of the sweep, or the cluster, read it."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_record(folder: Path) -> dict | None:
    """The record in a folder; None when there is none. A file that is not a JSON object raises ValueError."""
    path = Path(folder) / RECORD_NAME
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    return record


# what a record that says a job ended well holds besides its status: run.py writes them all
FINISHED_FIELDS = {
    "completed": ("config", "train", "eval.final"),
    "pruned": ("config", "train"),  # stopped before its final evaluation
    "dry_run": ("config", "params"),
}


def missing_fields(record: dict) -> list[str]:
    """Of the fields a record of its status must hold (FINISHED_FIELDS), those it lacks or holds empty."""
    return [path for path in FINISHED_FIELDS.get(record.get("status"), ())
            if not isinstance(lookup(record, path), dict) or not lookup(record, path)]  # fmt: skip


def lookup(record: dict, path: str, missing=None):
    """The value at a dotted path of a record or config (`eval.final.validation.loss`); `missing` where there is none."""
    node = record
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return missing
        node = node[part]
    return node


def job_folders(sweep: Path) -> list[Path]:
    """Sub-folders that Hydra made for jobs (they hold .hydra/) or that hold a record, in job order."""
    jobs = [p for p in sweep.iterdir() if p.is_dir() and ((p / ".hydra").is_dir() or (p / RECORD_NAME).is_file())]
    return sorted(jobs, key=lambda p: _job_order(p.name))


def _job_order(name: str) -> tuple:
    return not name.isdigit(), int(name) if name.isdigit() else 0, name


def job_outcomes(sweep: Path, numbered: int = 0) -> dict[str, str | None]:
    """How each job of a sweep ended, by folder name: None if it finished, else why it did not, from its record.

    The jobs are those of job_folders, and with `numbered`, folders 0..numbered-1 as well: a job
    whose process died before Hydra made its folder counts.
    """
    sweep = Path(sweep)
    names = {str(n) for n in range(numbered)}
    if sweep.is_dir():
        names |= {p.name for p in job_folders(sweep)}
    outcomes = {}
    for name in sorted(names, key=_job_order):
        try:
            record = read_record(sweep / name)
        except ValueError as e:
            outcomes[name] = f"unreadable record ({first_line(e)})"
            continue
        status = (record or {}).get("status")
        if record is None:
            outcomes[name] = "no record (killed, or it never started)"
        elif status == "running":
            outcomes[name] = "killed while running (its record says running)"
        elif status not in FINISHED:
            outcomes[name] = f"{status}: {record.get('error')}" if record.get("error") else str(status)
        else:
            outcomes[name] = None
    return outcomes


def _finite(value):
    """JSON has no NaN or infinity: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value

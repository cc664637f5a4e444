"""The run record: `metrics.json` in the run's folder, always valid JSON on disk."""

import json
import math
import os
import tempfile
from pathlib import Path

from transfer.errors import TransferError, first_line

RECORD_NAME = "metrics.json"
# how a job may end well: trained, a dry run's counts, or stopped early by a search (hydra/sweeper=optuna)
FINISHED = ("completed", "dry_run", "pruned")


def write_record(folder: Path, record: dict) -> Path:
    """Write atomically (temp file, then rename): a reader never sees half a record, and a failed write keeps the last."""
    path = folder / RECORD_NAME
    tmp = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".metrics.", suffix=".tmp")
        os.fchmod(fd, 0o644)  # mkstemp makes it private; a record is for everyone who reads the sweep
        with os.fdopen(fd, "w") as f:
            json.dump(_finite(record), f, indent=2, allow_nan=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise TransferError(
            f"cannot write the record {path} ({e.strerror}); free space there, or choose another output folder"
        ) from None
    finally:
        if tmp:
            Path(tmp).unlink(missing_ok=True)
    return path


def read_record(folder: Path) -> dict | None:
    """The record in a folder; None when there is none. A file that is not a JSON object raises ValueError."""
    path = Path(folder) / RECORD_NAME
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    return record


def job_outcomes(sweep: Path, numbered: int = 0) -> dict[str, str | None]:
    """How each job of a sweep ended, by folder name: None if it finished, else why it did not, from its record.

    The jobs are the sub-folders Hydra made (they hold .hydra/) or that hold a record, and with
    `numbered`, folders 0..numbered-1 as well: a job whose process died before Hydra made its folder counts.
    """
    sweep = Path(sweep)
    names = {str(n) for n in range(numbered)}
    if sweep.is_dir():
        made = [p for p in sweep.iterdir() if p.is_dir() and ((p / ".hydra").is_dir() or (p / RECORD_NAME).is_file())]
        names |= {p.name for p in made}
    outcomes = {}
    for name in sorted(names, key=lambda n: (not n.isdigit(), int(n) if n.isdigit() else 0, n)):
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

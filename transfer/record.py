"""The run record: `metrics.json` in the run's folder, always valid JSON on disk."""

import json
import math
import os
import tempfile
from pathlib import Path

from transfer.errors import TransferError

RECORD_NAME = "metrics.json"


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


def _finite(value):
    """JSON has no NaN or infinity: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value

"""The run record: `metrics.json` in the run's folder, always valid JSON on disk."""

import json
import math
import os
import tempfile
from pathlib import Path

RECORD_NAME = "metrics.json"


def write_record(folder: Path, record: dict) -> Path:
    """Write atomically (temp file, then rename): a reader never sees half a record."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / RECORD_NAME
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".metrics.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes it private; a record is for everyone who reads the sweep
        with os.fdopen(fd, "w") as f:
            json.dump(_finite(record), f, indent=2, allow_nan=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_record(folder: Path) -> dict | None:
    path = Path(folder) / RECORD_NAME
    return json.loads(path.read_text()) if path.is_file() else None


def _finite(value):
    """JSON has no NaN or infinity: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value

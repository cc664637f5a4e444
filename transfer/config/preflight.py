"""What a run will read, checked before anything runs: data files, the GPU, writable folders (model folders:
config/model.py).

Everything here is cheap and imports neither torch nor transformers: a sweep's every job is
checked at start-up, so a bad file stops the sweep before its first job, not an hour in.
Each problem is one line naming the file (and the line in it) and what is wrong.

Data files are scanned whole up to SCAN_BYTES (the loader meets the rest of a bigger file
and reports it the same way); results are cached per file version, so the jobs of a sweep
that share a file read it once.
"""

import csv
import ctypes
import importlib.metadata
import importlib.util
import io
import json
import os
import re
from pathlib import Path

from transfer.errors import TransferError

# file suffix -> the `datasets` builder that reads it
BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
SCAN_BYTES = 256 * 2**20
_scanned: dict[tuple, None] = {}


# ---------------------------------------------------------------- data files
def check_data_files(
    files, where: str, needs: list[tuple[str, ...]], hint: str | None = None, labels: tuple[str, ...] = ("label",)
) -> None:
    """Each file exists, is readable, of a supported type, and has the fields of one of `needs`.

    `needs` lists alternatives, each the fields a row must have: [("text",)] for text (which must
    then hold some), [("prompt", "completion"), ("messages",)] for examples of either format.
    Rows of examples are checked one by one (JSON, JSON Lines and CSV files): each holds one
    alternative's fields, as text or lists of messages (`labels`: the fields that hold a label
    instead), and the file holds some answer that is not empty.
    `hint` (how to make a missing file) follows the error for a missing file.
    """
    for f in files:
        path = Path(f).expanduser()
        if not path.exists():
            raise TransferError(f"{where}: no such file {f!r}" + (f"; {hint}" if hint else ""))
        if not path.is_file():
            raise TransferError(f"{where}: {f!r} is not a file")
        suffix = path.suffix.lower()
        if suffix not in BUILDERS:
            raise TransferError(f"{where}: {f!r} has an unsupported type; allowed: {', '.join(BUILDERS)}")
        stat = path.stat()
        key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, tuple(needs), tuple(labels))
        if key in _scanned:
            continue
        try:
            with open(path, "rb") as fh:
                head = fh.read(SCAN_BYTES)
        except OSError as e:
            raise TransferError(f"{where}: cannot read {f!r} ({e.strerror})") from None
        if not head.strip():
            raise TransferError(f"{where}: {f!r} is {'empty' if not head else 'only whitespace'}; it holds no text")
        complete = stat.st_size <= SCAN_BYTES
        if suffix == ".parquet":
            _check_parquet(path, f, where, needs)
        else:
            text = _decode(head, f, where, complete)
            check = {".txt": lambda *a: [], ".csv": _check_csv, ".jsonl": _check_json, ".json": _check_json}[suffix]
            rows = check(text, f, where, needs, complete)
            if not is_text(needs):
                _check_examples(rows, f, where, needs, labels, complete)
        _scanned[key] = None


def _decode(data: bytes, name: str, where: str, complete: bool) -> str:
    if not complete:  # the scan may have cut a character in two
        data = data[: data.rfind(b"\n") + 1] or data
    try:
        # utf-8-sig: an editor's byte-order mark would otherwise start the first header ("\ufefftext") or break JSON
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        body = e.object  # the bytes after a byte-order mark: where e.start counts from
        line = body[: e.start].count(b"\n") + 1
        raise TransferError(
            f"{where}: {name!r} line {line} is not UTF-8 (byte {body[e.start]:#04x} at offset "
            f"{e.start + len(data) - len(body)}); save the file as UTF-8"
        ) from None


def _check_json(text: str, name: str, where: str, needs: list[tuple[str, ...]], complete: bool) -> list:
    """JSON Lines (one object a line), or one JSON document: an array of objects, as `datasets` reads it.

    Returns the rows with the line each starts on."""
    stripped = text.lstrip()
    if complete and stripped[:1] == "[":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise TransferError(f"{where}: {name!r} line {e.lineno} is not JSON ({e.msg}, column {e.colno})") from None
        items = rows if isinstance(rows, list) else [rows]
        odd = next((r for r in items if not isinstance(r, dict)), None)
        if odd is not None:
            raise TransferError(
                f"{where}: {name!r} holds a JSON {type(odd).__name__} where an object with fields belongs"
            )
        _check_rows(items, name, where, needs)
        return list(zip(json_item_lines(text), items, strict=True)) if isinstance(rows, list) else [(1, rows)]
    rows = []
    lines = text.split("\n")  # not splitlines(): JSON text may hold U+2028 and other line separators raw
    for number, line in enumerate(lines if complete else lines[:-1], start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise TransferError(f"{where}: {name!r} line {number} is not JSON ({e.msg}, column {e.colno})") from None
        if not isinstance(row, dict):
            raise TransferError(
                f"{where}: {name!r} line {number} is a JSON {type(row).__name__}, not an object with fields"
            )
        rows.append((number, row))
    _check_rows([row for _, row in rows], name, where, needs)
    return rows


def _missing(fields: list[str], needs: list[tuple[str, ...]]) -> str | None:
    """None when the fields hold one of the alternatives; else what is missing, said for people."""
    if any(all(f in fields for f in alternative) for alternative in needs):
        return None
    if is_text(needs):
        return f"no field {needs[0][0]!r}"
    return f"none of the fields an example needs ({', '.join('+'.join(a) for a in needs)})"


def _check_rows(rows: list[dict], name: str, where: str, needs: list[tuple[str, ...]]) -> None:
    fields = list(dict.fromkeys(k for r in rows for k in r))
    missing = _missing(fields, needs)
    if missing:
        raise TransferError(f"{where}: {name!r} has {missing}; allowed: {', '.join(fields) or 'none'}")
    if is_text(needs):  # some of it must be there
        (field,) = needs[0]
        if not any(isinstance(r.get(field), str) and r[field].strip() for r in rows):
            raise TransferError(f"{where}: {name!r} holds no text in its field {field!r}")


def is_text(needs: list[tuple[str, ...]]) -> bool:
    """Whether `needs` asks for text (one field) rather than examples."""
    return len(needs) == 1 and len(needs[0]) == 1


def _check_examples(rows: list[tuple[int, dict]], name: str, where: str, needs, labels, complete: bool) -> None:
    """Each row holds one alternative's fields as text or messages, and some row an answer that is not empty."""
    answered = 0
    for line, row in rows:
        fields = alternative(row, needs)
        if fields is None:
            best = max(needs, key=lambda alt: sum(f in row for f in alt))
            lacking = [f for f in best if f not in row]
            what = (f"no {' or '.join(map(repr, lacking))}" if len(lacking) < len(best)
                    else f"none of the fields an example needs ({', '.join('+'.join(a) for a in needs)})")  # fmt: skip
            raise TransferError(f"{where}: {name!r} line {line} has {what}; it has: {', '.join(row) or 'no fields'}")
        for field in fields:
            problem = None if field in labels else not_text(row[field], conversation=len(fields) == 1)
            if problem:
                raise TransferError(f"{where}: {name!r} line {line}: {field!r} {problem}")
        answered += not all(blank(a) for a in answers(row, fields, labels))
    if complete and rows and not answered:
        raise TransferError(
            f"{where}: {name!r}: the answer of every one of its {len(rows)} rows is empty: nothing of an answer "
            "would be scored, only the end of each turn; allowed: rows with answers"
        )


def alternative(row: dict, needs: list[tuple[str, ...]]) -> tuple[str, ...] | None:
    """The first alternative of `needs` whose fields the row has, one with no null among them first (a row read by
    `datasets` has every field of its file, a null where it lacked one)."""
    return next((alt for alt in needs if all(row.get(f) is not None for f in alt)), None) or next(
        (alt for alt in needs if all(f in row for f in alt)), None
    )


def not_text(value, conversation: bool) -> str | None:
    """What is wrong with a prompt's or an answer's value, or None: text or a list of messages (a conversation's
    field: a list only)."""
    if isinstance(value, list) or (isinstance(value, str) and not conversation):
        return None
    allowed = "a list of messages" if conversation else "text or a list of messages"
    return f"is {described(value)}; allowed: {allowed}"


def described(value) -> str:
    """A JSON value for a message: null, text ('...'), a number (42), an object ({...})."""
    if value is None:
        return "null"
    kind = {bool: "a boolean", int: "a number", float: "a number", dict: "an object", str: "text"}.get(
        type(value), type(value).__name__
    )
    shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:36] + "..."
    return f"{kind} ({shown})"


def answers(row: dict, fields: tuple[str, ...], labels=()) -> list:
    """The answers of a row under an alternative of `needs`: a conversation's last message, else every field but the
    first (the prompt) and the labels: completion, output, chosen and rejected. A list of messages answers with its
    last one."""
    values = [row.get(fields[0])] if len(fields) == 1 else [row.get(f) for f in fields[1:] if f not in labels]
    out = []
    for value in values:
        if isinstance(value, list):
            last = value[-1] if value else None
            value = last.get("content", last.get("value")) if isinstance(last, dict) else None
        out.append(value)
    return out


def blank(answer) -> bool:
    """An answer that is there and empty: nothing of it can be scored."""
    return isinstance(answer, str) and not answer.strip()


def json_item_lines(text: str) -> list[int]:
    """The line each item of a JSON array (valid JSON) starts on."""
    decoder, between = json.JSONDecoder(), re.compile(r"[\s,]*")
    position = between.match(text, text.index("[") + 1).end()
    lines, line, counted = [], 1, 0
    while text[position] != "]":
        line += text.count("\n", counted, position)
        counted = position
        lines.append(line)
        _, position = decoder.raw_decode(text, position)
        position = between.match(text, position).end()
    return lines


def _check_csv(text: str, name: str, where: str, needs: list[tuple[str, ...]], complete: bool) -> list:
    """The header names the fields; returns the rows (for examples) with the line each starts on."""
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, [])
    missing = _missing(header, needs)
    if missing:
        raise TransferError(
            f"{where}: {name!r} has {missing} in its first row {header[:5]!r}; "
            "a CSV file needs a header row naming its columns"
        )
    if is_text(needs):
        return []
    return csv_rows(reader, header) if complete else []


def csv_rows(reader, header: list[str]) -> list[tuple[int, dict]]:
    """The records after the header, each a row of text cells with the line it starts on; blank lines skipped (as
    pandas does). A short record lacks its last fields."""
    rows, last = [], reader.line_num
    for cells in reader:
        if cells:
            rows.append((last + 1, dict(zip(header, cells, strict=False))))
        last = reader.line_num
    return rows


def _check_parquet(path: Path, name: str, where: str, needs: list[tuple[str, ...]]) -> None:
    with open(path, "rb") as fh:
        start = fh.read(4)
        fh.seek(max(0, path.stat().st_size - 4))
        end = fh.read(4)
    if start != b"PAR1" or end != b"PAR1":
        raise TransferError(f"{where}: {name!r} is not a Parquet file (or is truncated): it lacks the PAR1 marks")
    import pyarrow.parquet as pq

    try:
        fields = pq.read_schema(path).names
    except Exception as e:
        raise TransferError(f"{where}: {name!r} is an unreadable Parquet file ({str(e).splitlines()[0]})") from None
    missing = _missing(fields, needs)
    if missing:
        raise TransferError(f"{where}: {name!r} has {missing}; allowed: {', '.join(fields)}")


# ---------------------------------------------------------------- the GPU
def installed(module: str) -> bool:
    """Whether `module` can be imported here, found without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # its parent package is missing
        return False


def cuda_available() -> bool | None:
    """Whether torch would find a CUDA device, asked without importing torch: False, True, or None (cannot tell).

    Reads the installed torch's build tag and asks NVIDIA's management library for devices,
    which, unlike the CUDA driver, neither makes a context nor minds a later fork.
    """
    try:
        version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return False
    if "+cpu" in version:
        return False
    if "+rocm" in version:
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return False
    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return False
    count = ctypes.c_uint(0)
    if nvml.nvmlInit_v2() != 0:
        return False
    try:
        return nvml.nvmlDeviceGetCount_v2(ctypes.byref(count)) == 0 and count.value > 0
    finally:
        nvml.nvmlShutdown()


# ---------------------------------------------------------------- folders the run will write in
def check_writable_folder(folder: Path, what: str) -> None:
    """`folder`, or the nearest folder above it that exists, is a folder this process may write in: refused in one
    line otherwise (a read-only place, or a file in its way), at start-up and without making anything."""
    folder = Path(folder).expanduser()
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise TransferError(f"{what}={str(folder)!r}: {existing} is a file, not a folder; allowed: a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise TransferError(
            f"{what}={str(folder)!r}: {existing} cannot be written in; allowed: a folder this job can write in"
        )

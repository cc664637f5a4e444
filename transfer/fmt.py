"""What people read on the console: durations and metrics in logs and progress lines, without third-party notices
that would hide them."""

import logging
import math
import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path


def duration(seconds: float) -> str:
    """'2 h 5 min', '3 min 20 s', '42 s', '0.35 s': whole units where they are big enough to read."""
    if seconds < 10:
        return f"{seconds:.2g} s"
    minutes, s = divmod(round(seconds), 60)
    hours, m = divmod(minutes, 60)
    return f"{hours} h {m} min" if hours else f"{m} min {s} s" if m else f"{s} s"


def number(value: float) -> str:
    """'2.276', '124,712', '3.755e-5': four significant digits, big numbers whole with thousands separators, tiny ones
    with a short exponent; for people only (records keep the value as it is)."""
    if not math.isfinite(value) or value == 0:
        return f"{value:g}"
    if 1e4 <= abs(value) < 1e15:  # where 4 significant digits would turn to an exponent that few read at a glance
        return f"{value:,.0f}"
    mantissa, _, exponent = f"{value:.4g}".partition("e")
    return f"{mantissa}e{int(exponent)}" if exponent else mantissa


def count(n: int, word: str, plural: str | None = None) -> str:
    """'1 row', '2 rows', '1,024 rows': a number of things, the word in the plural unless there is one (`plural`
    where adding an s is wrong: 'entries')."""
    return f"{n:,} {word if n == 1 else plural or word + 's'}"


PROGRESS_EVERY_S = 30.0  # a log line this often in a long loop without a progress bar (progress_lines)


def progress_lines(items, total: int, doing: str, unit: str, log: logging.Logger, every_s: float | None = None,
                   clock=time.monotonic):  # fmt: skip
    """`items`, with a log line every `every_s` seconds (PROGRESS_EVERY_S) while they are consumed: how many of
    `total` are done and the time left at the pace so far. For a log file or a console without progress bars, where a
    long loop would say nothing for minutes."""
    every_s = PROGRESS_EVERY_S if every_s is None else every_s
    start = last = clock()
    for done, item in enumerate(items):
        now = clock() if done else start
        if now - last >= every_s and done:
            last = now
            left = (now - start) / done * (total - done)
            log.info("%s: %d of %d %s, about %s left", doing, done, total, unit, duration(left))
        yield item


def describe_metrics(result: dict) -> str:
    """'loss 2.31, perplexity 10.1, auc 0.612': the metrics of an evaluation, for a log line."""
    return ", ".join(f"{k} {number(v)}" for k, v in result.items() if isinstance(v, float))


def where(folder) -> str:
    """A folder as a user finds it: relative to the working directory when it lies below it, else absolute."""
    folder = Path(folder).absolute()
    try:
        return str(folder.relative_to(Path.cwd()))
    except ValueError:
        return str(folder)


def quiet_known_notices() -> None:
    """Third-party notices that are harmless here and would hide the lines a user must read."""
    # bitsandbytes looks for an optional CPU kernel package when peft imports it; 4-bit runs on CUDA only here
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    # peft asks transformers for a renamed attribute; nothing for a user to change
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def reader_may_leave(main: Callable[[], int | None]) -> int | str | None:
    """`main()` of a command whose output its reader may stop reading (`python -m transfer.aggregate | head`): where
    the reader leaves, the command ends quietly with status 1, as in Python's recipe
    (https://docs.python.org/3/library/signal.html#note-on-sigpipe), not in a BrokenPipeError traceback. What it
    printed stops there; a log line has no error to stop at (logging never raises), so a run logging to the console
    goes on to its end without one, and its log file and record are whole. Its status otherwise is main's."""
    sys.stdout = _Console(sys.stdout)
    try:
        try:
            code = main()
        except SystemExit as e:
            code = e.code
        sys.stdout.flush()  # what is still buffered meets the closed pipe here, not in Python's flush at exit
    except BrokenPipeError:
        _reader_left(sys.stdout)
        return 1
    return code


class _Console:
    """Standard output that, once its reader has left, is /dev/null (reader_may_leave)."""

    def __init__(self, stream):
        self._stream = stream

    def __getattr__(self, name):
        return getattr(self._stream, name)

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            _reader_left(self._stream)
            raise

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            _reader_left(self._stream)
            raise


def _reader_left(stream) -> None:
    # the lines still to come, and the rest of the buffer, go nowhere instead of to a closed pipe; logging's report
    # of its own failed write (a traceback a line) would only say that again
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, stream.fileno())
    os.close(devnull)
    logging.raiseExceptions = False

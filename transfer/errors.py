class TransferError(Exception):
    """Bad input the user can fix (a config value, a path, an empty split).

    Reported as one line naming the value and what is allowed, with no traceback,
    and the process exits non-zero. Anything else is a bug and keeps its traceback.
    """


class UnsafeCheckpoint(TransferError):
    """A checkpoint file that holds more than tensors and plain values: made elsewhere, never loaded."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM: the run stops at a step boundary, says `interrupted` in its record, and can be resumed."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message: what a one-line error report shows."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def reason(e: BaseException) -> str:
    """Why a write or read failed, in a few words: an OS error's own ("No space left on device"), else the first
    line; of torch.distributed.checkpoint's CheckpointException, its first failing rank's error, not its rank list."""
    failures = getattr(e, "failures", None)
    if failures:
        error = next(iter(failures.values()))
        e = error[0] if isinstance(error, tuple) else error
    return e.strerror if isinstance(e, OSError) and e.strerror else first_line(e)


def innermost(e: BaseException) -> BaseException:
    """The exception at the bottom of a chain of wrappers (`raise ... from`, or raised while handling)."""
    seen = {id(e)}
    while (e.__cause__ or e.__context__) is not None and id(e.__cause__ or e.__context__) not in seen:
        e = e.__cause__ or e.__context__
        seen.add(id(e))
    return e

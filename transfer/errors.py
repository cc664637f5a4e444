class TransferError(Exception):
    """Bad input the user can fix (a config value, a path, an empty split).

    Reported as one line naming the value and what is allowed, with no traceback,
    and the process exits non-zero. Anything else is a bug and keeps its traceback.
    """


def first_line(e: BaseException) -> str:
    """The first line of an exception's message: what a one-line error report shows."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__

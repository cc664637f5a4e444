"""One writer per output folder: a lock file that names its holder.

The lock is the kernel's advisory lock (flock) on `<folder>/.transfer.lock`, and the file
says which process holds it. The kernel drops the lock when that process dies however it
dies, so a lock left by a killed run is stale by construction and the next run takes it
over; no guessing from pids, which get reused. A second writer is refused with one line
naming the holder.
"""

import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path

from transfer.errors import TransferError

log = logging.getLogger(__name__)
LOCK_NAME = ".transfer.lock"
_held: dict[Path, int] = {}  # folder -> open file descriptor holding its lock
_made: dict[Path, list[Path]] = {}  # folder -> the folders its locking created, removed again if left empty


def lock_folder(folder: Path, what: str = "run") -> bool:
    """Take `folder`'s lock for this process (creating the folder), or raise TransferError naming its holder.

    False when this process holds it already (and nothing was done), True when it was taken now.
    """
    folder = Path(folder).resolve()
    if folder in _held:
        return False
    path = folder / LOCK_NAME
    made = [p for p in (folder, *folder.parents) if not p.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(fd)
                os.close(fd)
                raise TransferError(
                    f"{folder} is in use by {_describe(holder)}; a second writer would lose records: "
                    f"wait for that {what} to end, or choose another output folder"
                ) from None
            # its last holder may have removed the file between our open and our lock: lock the file that is there
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        stale = _holder(fd)
        if stale:
            log.warning("took over the lock of %s, which ended without releasing it", _describe(stale))
        os.ftruncate(fd, 0)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.pwrite(fd, json.dumps(me).encode(), 0)
    except OSError as e:
        raise TransferError(
            f"cannot write in the output folder {folder} ({e.strerror}); choose another one "
            f"(hydra.run.dir=... or hydra.sweep.dir=...)"
        ) from None
    _held[folder] = fd
    _made[folder] = made
    return True


def unlock_folder(folder: Path) -> None:
    """Release a lock this process holds: the file goes, then the lock."""
    folder = Path(folder).resolve()
    fd = _held.pop(folder, None)
    if fd is None:
        return
    try:
        (folder / LOCK_NAME).unlink(missing_ok=True)
        for made in _made.pop(folder, []):  # a refused run leaves no empty folders behind
            made.rmdir()
    except OSError:
        pass  # not empty (the run wrote there), or made read-only meanwhile; the kernel drops the lock below
    os.close(fd)


def unlock_all() -> None:
    for folder in list(_held):
        unlock_folder(folder)


def _holder(fd: int) -> dict:
    try:
        holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return holder if isinstance(holder, dict) else {}
    except ValueError:
        return {}


def _describe(holder: dict) -> str:
    if not holder:
        return "another process"
    return f"pid {holder.get('pid')} on {holder.get('host')} (since {holder.get('since')})"

"""One job's life in its process: its record (`metrics.json`, RunRecord) and what it changes in the process for
its length (JobContext), each a context manager that ends it however the job ends. The phases in between are
transfer.run's."""

import contextlib
import logging
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import transformers
from omegaconf import OmegaConf

from transfer import cache
from transfer.errors import TransferError, first_line
from transfer.record import TRAINED, write_record
from transfer.training import distributed, speed
from transfer.training.oom import release_memory

log = logging.getLogger("transfer")
RECORD_VERSION = 3  # 2: objectives, metrics per split by name, real tokens; 3: forgetting probes ref_<name>


class JobContext:
    """What one job changes in its process for the job's length, undone when it ends, however it ends: Liger's
    patches of transformers' modules, the watch on what torch.compile gives up, the sweep cache's folder, the device
    memory it held. A process may run job after job (the basic launcher, a Ray worker): the next starts clean."""

    def __enter__(self) -> "JobContext":
        speed.watch_compile()
        return self

    def use_cache(self, folder: Path | None) -> dict:
        """Share work in `folder` (None: compute everything) until the job ends; its hit and miss counts."""
        return cache.start(folder)

    def compile_gave_up(self) -> list[str]:
        """What torch.compile gave up on during this job (its own words), which then ran uncompiled."""
        return speed.compile_gave_up()

    def __exit__(self, *exc) -> None:
        cache.stop()
        speed.stop_watching_compile()
        speed.undo_liger()
        release_memory()


class RunRecord:
    """The job's `metrics.json` through its life: written when it starts (`running`), when asked (after the
    baseline), and at its end however it ends: the status the run set (completed, pruned, dry_run), or `failed` or
    `interrupted` with a one-line error; the time it finished and its wall time. Rank 0 alone writes."""

    def __init__(self, out_dir: Path, cfg, choices: dict, overrides: list[str]):
        self.out_dir = out_dir
        self.data = {
            "record_version": RECORD_VERSION,
            "status": "running",
            "error": None,
            "choices": dict(choices),
            "overrides": list(overrides),
            "config": OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
            "started_at": _now(),
            "versions": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "transformers": transformers.__version__,
            },
            "eval": {},
        }

    def __getitem__(self, key: str):
        return self.data[key]

    def __setitem__(self, key: str, value) -> None:
        self.data[key] = value

    def write(self) -> None:
        if distributed.is_main():  # one writer
            write_record(self.out_dir, self.data)

    @contextlib.contextmanager
    def timed(self, part: str):
        """The block's seconds, as timing.<part>."""
        clock = time.perf_counter()
        yield
        self.timing[part] = time.perf_counter() - clock

    def __enter__(self) -> "RunRecord":
        self.write()
        self.wall_start = time.perf_counter()
        self.timing = self.data["timing"] = {}
        return self

    def __exit__(self, kind, e, traceback) -> None:
        if isinstance(e, KeyboardInterrupt):
            self.data["status"] = "interrupted"
            why = "SIGTERM" if str(e) == "SIGTERM" else "Ctrl-C"
            self.data["error"] = f"interrupted ({why}); resume it with resume=true"
        elif e is not None:
            self.data["status"] = "failed"
            self.data["error"] = (
                first_line(e) if isinstance(e, TransferError) else f"{type(e).__name__}: {first_line(e)}"
            )
        self.data["finished_at"] = _now()
        self.data["wall_seconds"] = time.perf_counter() - self.wall_start
        try:
            self.write()
        except TransferError as error:  # a full disk
            if self.data["status"] in TRAINED:
                raise
            log.error("%s", error)  # and the error that ended the run is reported after this


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")

"""`python -m transfer`: check the command line, lock the output folder, then let Hydra run the job(s).

Heavy imports (torch, transformers) happen inside the job, after the config of
every job has been checked, so a bad override fails within a second.
"""

import contextlib
import errno
import logging
import os
import shlex
import signal
import sys
import time
from pathlib import Path

import hydra
import hydra._internal.utils
import hydra.core.utils
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from transfer import STARTED
from transfer.config import schema
from transfer.config.compose import CONF_DIR, Plan, check_command_line
from transfer.config.folders import AlreadyDone
from transfer.errors import Interrupted, TransferError, reason
from transfer.fmt import duration, quiet_known_notices, where
from transfer.record import write_atomically
from transfer.sweep import launchers
from transfer.sweep.lock import lock_folder, unlock_all, unlock_folder
from transfer.training import distributed

log = logging.getLogger("transfer")
_job_seconds: list[float] = []  # the finished jobs of this process's sweep, for the time left
_plan: Plan | None = None
SWEEP_JOBS = "TRANSFER_SWEEP_JOBS"  # the sweep's size, for its jobs' position lines wherever a launcher runs them
# set by main(): the process start is its first job's to count. A job in another process (a Ray
# worker that runs job after job, a submitit process) starts its clock when the job starts.
_process_start_unclaimed = False
_unwritten: list[str] = []  # what Hydra could not write into the job's .hydra/ folder (_save_config), for job()


def _save_config(cfg, filename: str, output_dir: Path) -> None:
    """Hydra's writer of a job's .hydra/ files, made whole or nothing: written aside, then renamed over the old one.

    Hydra's own truncates the file first, so a full disk leaves it cut short, and its error is a traceback
    before the job starts. Here the old file stays, and the job says why in one line (job())."""
    path = Path(output_dir) / filename
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, lambda f: f.write(OmegaConf.to_yaml(cfg).encode("utf-8")))
    except OSError as e:
        _unwritten.append(f"cannot write {path} ({reason(e)})")


hydra.core.utils._save_config = _save_config  # run_job looks it up there when each job starts, in every launcher
# what a write answers on a full disk, over a quota, or in a folder that cannot be written
CANNOT_WRITE = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EACCES)
_hydra_run_and_report = hydra._internal.utils.run_and_report


def _run_and_report(func):
    """Hydra's runner, for what Hydra writes outside a job (a sweep's multirun.yaml): where that cannot be written,
    one line and exit 1, not the traceback Hydra prints. A job's own errors never reach it (job())."""

    def guarded():
        try:
            return func()
        except OSError as e:
            if e.errno not in CANNOT_WRITE:
                raise
            where = f" {_plan.out_dir}" if _plan is not None else ""
            print(f"error: cannot write in the output folder{where} ({reason(e)}); free space there, or choose "
                  "another output folder", file=sys.stderr)  # fmt: skip
            sys.exit(1)

    return _hydra_run_and_report(guarded)


hydra._internal.utils.run_and_report = _run_and_report  # hydra.main's wrapper calls it by this name


def _close_file_logs(folder: Path) -> None:
    """Hydra's log file in a folder that cannot be written: each line's failure would print a traceback."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).parent == folder.resolve():
            root.removeHandler(handler)
            with contextlib.suppress(OSError):
                handler.close()


def job(cfg: DictConfig) -> None:
    """One job, in whichever process the launcher runs it (this one, a Ray worker, a SLURM node).

    Hydra's launchers get this function; it is a module-level name of its own so that those that
    send it to another process pickle a reference to it, and the job there reads that process's
    state, not a copy of this one's. Nothing it does reaches back: how it ended is in its record.
    """
    global _process_start_unclaimed
    # a job's clock starts in the job; the launching process's first job counts the process's imports
    started = STARTED if _process_start_unclaimed else time.perf_counter()
    _process_start_unclaimed = False
    quiet_known_notices()
    tasks = launchers.join_tasks()  # a submitit job of several tasks: one job on several processes
    from transfer.job import JobContext
    from transfer.run import run_experiment

    hc = HydraConfig.get()
    out_dir = Path(hc.runtime.output_dir)
    unwritten = _unwritten[:]
    _unwritten.clear()
    if unwritten:  # a full disk, most likely: the log file there cannot be written either
        _close_file_logs(out_dir)
    choices = {g: hc.runtime.choices.get(g) for g in schema.GROUPS}
    choices["probes"] = ",".join(cfg.eval.probes) or "none"  # a list group: Hydra records no choice for it
    _log_sweep_position(hc)
    locked_here = failed = False
    # the job's undo work (Liger's patches, the compile watch, the cache folder, device memory) is done once its
    # error is reported and dropped: what the error's frames held is freed then. Under submitit, SIGTERM and its
    # warning signal already stop the job (hydra_plugins/transfer_submitit_launcher: launchers.requeue_when_preempted)
    with JobContext() as context:
        try:
            if unwritten:
                raise TransferError(
                    f"{unwritten[0]}; nothing was run: free space there, or choose another output folder"
                )
            # a sweep's job folder; a single run's is held already, and under torchrun rank 0 holds it
            locked_here = distributed.is_main() and lock_folder(out_dir)
            if hc.mode == RunMode.MULTIRUN:
                launchers.continue_earlier_attempt(cfg, out_dir)
            sweep = Path(hc.runtime.cwd, hc.sweep.dir) if hc.mode == RunMode.MULTIRUN else None
            run_experiment(
                cfg, out_dir, choices, list(hc.overrides.task), started=started, sweep=sweep, context=context
            )
        except TransferError as e:
            log.error("error: %s", e)
            log.info("its record is in %s", where(out_dir))
            failed = True
        except KeyboardInterrupt:
            raise  # the record says `interrupted`; main() says how to resume
        except Exception:
            log.exception("run failed; its record is in %s", where(out_dir))
            failed = True
        finally:
            if locked_here:
                unlock_folder(out_dir)
            _job_seconds.append(time.perf_counter() - started)
            if tasks:
                distributed.shutdown()
    if failed and distributed.active():
        sys.exit(1)  # torchrun then stops the other processes, which would wait for this one in a collective


_job = hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")(job)


def _log_sweep_position(hc) -> None:
    """'job 3 of 8', and the time left at the mean pace of the jobs this process has run so far.

    A job in another process (Ray, submitit, SLURM) knows the sweep's size from the environment the launching
    process handed down; its jobs run side by side, so it says no time left."""
    if hc.mode != RunMode.MULTIRUN:
        return
    jobs = _plan.jobs if _plan is not None else int(os.environ.get(SWEEP_JOBS, "0")) or None
    number = hc.job.num + 1
    left = ""
    if _job_seconds and _plan is not None:  # the launching process runs the jobs one after another
        mean = sum(_job_seconds) / len(_job_seconds)
        left = f"; about {duration(mean * (jobs - number + 1))} left at {duration(mean)} a job"
    overrides = " ".join(o for o in hc.overrides.task if not o.startswith("hydra"))
    log.info("job %d%s: %s%s", number, f" of {jobs}" if jobs else "", overrides, left)


def _terminate(signum, frame) -> None:
    raise Interrupted("SIGTERM")


def resume_command(argv: list[str], plan: Plan) -> str:
    """The command line that continues what `argv` started, in the folder it wrote."""
    key = "hydra.sweep.dir" if plan.multirun else "hydra.run.dir"
    kept = [a for a in argv if not a.startswith(("resume=", f"{key}=", f"+{key}="))]
    return shlex.join(["python", "-m", "transfer", *kept, "resume=true", f"{key}={plan.out_dir}"])


def _check(argv: list[str]) -> tuple[int, str] | None:
    """The command line checked and its output folder locked and judged: None to go on, else (exit code, line)."""
    global _plan
    try:
        _plan = check_command_line(argv)
        if _plan is not None and distributed.is_main():  # one writer: under torchrun, rank 0
            lock_folder(_plan.out_dir, "sweep" if _plan.multirun else "run")
            _plan.check_folder()
    except AlreadyDone as e:
        unlock_all()
        return 0, str(e)
    except TransferError as e:
        unlock_all()
        return 2, f"error: {e}"
    return None


def main() -> None:
    argv = sys.argv[1:]
    distributed.init()  # torchrun's processes run one job together (transfer/distributed.py)
    verdict = _check(argv)
    if distributed.active():
        # every process goes where rank 0 says, into the folder rank 0 pinned (a ${now} may differ by a second)
        verdict, pinned = distributed.broadcast((verdict, _plan.argv if _plan is not None else None))
        if _plan is not None and pinned is not None:
            quiet = ["hydra.output_subdir=null", "hydra/job_logging=stdout", "hydra.job_logging.root.level=WARNING"]
            _plan.argv = pinned if distributed.is_main() else [*pinned, *quiet]
        if not distributed.is_main():
            os.environ["TQDM_DISABLE"] = "1"  # the libraries' bars (loading weights); ours ask distributed.bars_off
    if verdict is not None:
        code, line = verdict
        if distributed.is_main():
            print(line, file=sys.stderr if code else sys.stdout)
        sys.exit(code)
    signal.signal(signal.SIGTERM, _terminate)  # a scheduler's stop is an interruption like Ctrl-C
    if _plan is not None:
        sys.argv[1:] = _plan.argv
        if _plan.multirun:
            os.environ[SWEEP_JOBS] = str(_plan.jobs)  # inherited by the processes a launcher starts
    global _process_start_unclaimed
    _process_start_unclaimed = True
    try:
        _job()
    except KeyboardInterrupt as e:
        what = "terminated (SIGTERM)" if str(e) == "SIGTERM" else "interrupted (Ctrl-C)"
        where = f"; continue with: {resume_command(argv, _plan)}" if _plan is not None else ""
        print(f"{what}{where}", file=sys.stderr)
        sys.exit(130)
    finally:
        unlock_all()
        distributed.shutdown()
    if _plan is not None and distributed.is_main():
        sys.exit(launchers.exit_status(_plan))

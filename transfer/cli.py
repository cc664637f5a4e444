"""`python -m transfer`: check the command line, lock the output folder, then let Hydra run the job(s).

Heavy imports (torch, transformers) happen inside the job, after the config of
every job has been checked, so a bad override fails within a second.
"""

import logging
import shlex
import signal
import sys
import time
import warnings

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from transfer import STARTED, schema
from transfer.errors import Interrupted, TransferError
from transfer.fmt import duration
from transfer.lock import lock_folder, unlock_all, unlock_folder
from transfer.validate import CONF_DIR, AlreadyDone, Plan, check_command_line

log = logging.getLogger("transfer")
_failed_jobs: list[str] = []
_job_seconds: list[float] = []  # the finished jobs of this process's sweep, for the time left
_plan: Plan | None = None


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def _job(cfg: DictConfig) -> None:
    from pathlib import Path

    # a job's clock starts in the job; the first one's start-up includes the process's imports
    started = STARTED if not _job_seconds else time.perf_counter()
    _silence_known_noise()
    from transfer.run import run_experiment

    hc = HydraConfig.get()
    out_dir = Path(hc.runtime.output_dir)
    choices = {g: hc.runtime.choices.get(g) for g in schema.GROUPS}
    choices["reference"] = hc.runtime.choices.get("eval/reference")
    _log_sweep_position(hc)
    locked_here = False
    try:
        locked_here = lock_folder(out_dir)  # a sweep's job folder; a single run's is held already
        run_experiment(cfg, out_dir, choices, list(hc.overrides.task), started=started)
    except TransferError as e:
        log.error("error: %s", e)
        _failed_jobs.append(str(out_dir))
    except KeyboardInterrupt:
        raise  # the record says `interrupted`; main() says how to resume
    except Exception:
        log.exception("run failed; its record is in %s", out_dir)
        _failed_jobs.append(str(out_dir))
    finally:
        if locked_here:
            unlock_folder(out_dir)
        _release_device_memory()
        _job_seconds.append(time.perf_counter() - started)


def _log_sweep_position(hc) -> None:
    """'job 3 of 8', and the time left at the mean pace of the jobs done so far."""
    if _plan is None or not _plan.multirun:
        return
    number = hc.job.num + 1
    left = ""
    if _job_seconds:
        mean = sum(_job_seconds) / len(_job_seconds)
        left = f"; about {duration(mean * (_plan.jobs - number + 1))} left at {duration(mean)} a job"
    overrides = " ".join(o for o in hc.overrides.task if not o.startswith("hydra"))
    log.info("job %d of %d: %s%s", number, _plan.jobs, overrides, left)


def _silence_known_noise() -> None:
    """Third-party notices that are harmless here and would hide the lines a user must read."""
    # bitsandbytes looks for an optional CPU kernel package when peft imports it; 4-bit runs on CUDA only here
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    # peft asks transformers for a renamed attribute; nothing for a user to change
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def _release_device_memory() -> None:
    """A sweep runs its jobs in one process: the next job starts with the GPU memory this one held."""
    from transfer.oom import release_memory  # torch, imported only once a job has run

    release_memory()


def _terminate(signum, frame) -> None:
    raise Interrupted("SIGTERM")


def resume_command(argv: list[str], plan: Plan) -> str:
    """The command line that continues what `argv` started, in the folder it wrote."""
    key = "hydra.sweep.dir" if plan.multirun else "hydra.run.dir"
    kept = [a for a in argv if not a.startswith(("resume=", f"{key}=", f"+{key}="))]
    return shlex.join(["python", "-m", "transfer", *kept, "resume=true", f"{key}={plan.out_dir}"])


def main() -> None:
    global _plan
    argv = sys.argv[1:]
    try:
        _plan = check_command_line(argv)
        if _plan is not None:
            lock_folder(_plan.out_dir, "sweep" if _plan.multirun else "run")
            _plan.check_folder()
    except AlreadyDone as e:
        unlock_all()
        print(e)
        sys.exit(0)
    except TransferError as e:
        unlock_all()
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    signal.signal(signal.SIGTERM, _terminate)  # a scheduler's stop is an interruption like Ctrl-C
    if _plan is not None:
        sys.argv[1:] = _plan.argv
    try:
        _job()
    except KeyboardInterrupt as e:
        what = "terminated (SIGTERM)" if str(e) == "SIGTERM" else "interrupted (Ctrl-C)"
        where = f"; continue with: {resume_command(argv, _plan)}" if _plan is not None else ""
        print(f"{what}{where}", file=sys.stderr)
        sys.exit(130)
    finally:
        unlock_all()
    if _failed_jobs:
        if len(_failed_jobs) > 1 or "-m" in sys.argv or "--multirun" in sys.argv:
            print(f"error: {len(_failed_jobs)} job(s) failed: {', '.join(_failed_jobs)}", file=sys.stderr)
        sys.exit(1)

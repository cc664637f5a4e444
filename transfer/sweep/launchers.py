"""What a job needs when a launcher other than Hydra's basic one runs it (Ray, submitit/SLURM): to join its
other tasks (a submitit job of several is one job on several processes), to continue an earlier attempt
of itself, to stop cleanly before submitit requeues it, and a sweep's exit status read from the jobs'
records rather than from the launching process, which may never have seen them run.
"""

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

import yaml
from omegaconf import DictConfig

from transfer.config.compose import Plan
from transfer.config.folders import read_previous
from transfer.errors import Interrupted, first_line
from transfer.fmt import count
from transfer.record import FINISHED, job_outcomes, read_record
from transfer.training import distributed

log = logging.getLogger("transfer")


def join_tasks() -> bool:
    """A submitit job of several tasks (hydra.launcher.tasks_per_node, nodes) is one job on several processes, as
    under torchrun: each task takes its rank from submitit, joins the others, and all but rank 0 log warnings only.
    True when this process joined (it leaves again at the job's end: distributed.shutdown)."""
    if distributed.active() or "SUBMITIT_EXECUTOR" not in os.environ:
        return False
    import submitit

    if submitit.JobEnvironment().num_tasks < 2:
        return False
    # every task sees the node's GPUs; distributed.init picks the local rank's
    # submitit's values win over any MASTER_* a cluster's environment left
    submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    distributed.init()
    if not distributed.is_main():
        logging.getLogger().setLevel(logging.WARNING)
        os.environ["TQDM_DISABLE"] = "1"  # the libraries' bars (loading weights); ours ask distributed.bars_off
    return True


def continue_earlier_attempt(cfg: DictConfig, out_dir) -> None:
    """A sweep's job that finds a record in its folder continues it, as resume=true would.

    The start-up check refuses a sweep into folders that hold records (resume=true aside), so
    such a record is this job's own from an earlier attempt: submitit requeued the job after a
    pre-emption or a time limit, or Ray ran it again after its worker died. A completed one is
    skipped; any other continues from its last intact checkpoint, under the same config.
    """
    if cfg.resume is not False:
        return
    earlier = distributed.broadcast(read_previous(out_dir))  # under torchrun, rank 0's look, the same everywhere
    if earlier is not None:
        log.warning("%s holds an earlier attempt of this job (%s): continuing it", out_dir, earlier.get("status"))
        cfg.resume = True


@contextlib.contextmanager
def requeue_when_preempted():
    """Under submitit, its warning signal (USR2 before a time limit or a pre-emption) stops the run as SIGTERM does.

    The training loop then stops at the end of a step with a checkpoint (elsewhere the run stops at
    once), the record says `interrupted`, and only then does submitit's own handler requeue the job
    and exit; called again in the same folder, the job continues from that checkpoint. SIGTERM itself (a
    stopped sweep's cancel_jobs, a cluster's) stops the job as it does a run outside submitit, which ignores it.
    """
    if "SUBMITIT_EXECUTOR" not in os.environ or threading.current_thread() is not threading.main_thread():
        yield
        return
    from submitit import JobEnvironment

    warning = getattr(signal, "SIG" + JobEnvironment.USR_SIG)
    requeue = signal.getsignal(warning)  # submitit's: saves the call for the next attempt, requeues, exits
    bypass = signal.getsignal(signal.SIGTERM)  # submitit's: logs the signal and ignores it
    warned = []

    def terminate(signum, frame):
        raise Interrupted("SIGTERM")

    def stop(signum, frame):
        warned.append(frame)
        handler = signal.getsignal(signal.SIGTERM)
        if handler is not terminate and callable(handler):
            handler(signal.SIGTERM, frame)  # the training loop's: it stops after this step
        else:
            raise Interrupted("SIGTERM")

    # A stopped sweep (Ctrl-C, cancel_jobs) sends its local jobs SIGTERM: submitit's handler ignored it outside
    # training (loading, the baseline evaluation), and the job ran on until the cancel after cancel_jobs' grace.
    signal.signal(signal.SIGTERM, terminate)
    signal.signal(warning, stop)
    try:
        yield
    except KeyboardInterrupt:
        if warned and callable(requeue):
            requeue(warning, warned[0])
        raise
    finally:
        signal.signal(warning, requeue)
        signal.signal(signal.SIGTERM, bypass)


def exit_status(plan: Plan) -> int:
    """0 when every job finished, judged by the records the jobs left, wherever they ran; else 1, with one line for a sweep.

    Read from the folders, not from this process, because a launcher may have run the jobs in
    other processes or on other machines; after the sweep has returned, so after its tables.
    """
    if not plan.multirun:  # the job ran here and has said why on this terminal
        try:
            record = read_record(plan.out_dir)
        except ValueError:
            return 1
        return 0 if (record or {}).get("status") in FINISHED else 1
    searched = search_failure(plan.out_dir)
    if searched:  # the search's own line: no trial gave its metric, and the first one's reason
        print(f"error: {searched}", file=sys.stderr)
        return 1
    outcomes = job_outcomes(plan.out_dir, plan.jobs if plan.by_number else 0)
    unfinished = {name: why for name, why in outcomes.items() if why}
    if not unfinished:
        return 0
    detail = "; ".join(f"{name}: {why}" for name, why in unfinished.items())
    line = f"error: {len(unfinished)} of {len(outcomes)} jobs in {plan.out_dir} did not finish: {detail}"
    print(line, file=sys.stderr)
    return 1


def search_failure(sweep) -> str | None:
    """What a search's summary (hydra/sweeper=optuna) says went wrong: no trial produced its metric; else None."""
    from transfer.sweep.search import SUMMARY_NAME

    path = Path(sweep) / SUMMARY_NAME
    try:
        summary = yaml.safe_load(path.read_text()) if path.is_file() else None
    except (OSError, yaml.YAMLError):
        return None
    return summary.get("error") if isinstance(summary, dict) and summary.get("best") is None else None


def wait_for_jobs(submit, overrides: list, first_number: int = 0, poll_s: float = 1.0) -> list:
    """The jobs that `submit()` starts (submitit's), and their returns (hydra JobReturn) once every one has ended.

    A job that died (killed, out of memory, cancelled on the cluster) or raised returns an empty
    JobReturn: Hydra's sweepers raise on a failed one, and how the job ended is in its record, which
    exit_status reads. Stopped while it waits (Ctrl-C, SIGTERM, its terminal closed), it cancels the jobs
    still running and waits for them to end: none goes on training after the command has returned. A stop
    while the jobs are being submitted acts once submit() has returned them, so that those started by then
    are stopped too (they trained on to their end after the command had returned).
    """
    from hydra.core.utils import JobReturn, JobStatus

    jobs = []
    with _hangup_stops():
        try:
            with _held(signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                jobs = submit()
            while not all(job.done() for job in jobs):
                time.sleep(poll_s)
        except BaseException:
            cancel_jobs(jobs)
            raise
    returns = []
    for number, (job, job_overrides) in enumerate(zip(jobs, overrides, strict=True), start=first_number):
        why = _no_result(job)
        if why is None:
            try:
                returns.append(job.results()[0])
                continue
            except Exception as e:  # submitit's UncompletedJobError, FailedJobError: the task raised or died
                why = first_line(e)
        log.warning("job %d (submitit job %s) ended without a result: %s", number, job.job_id, why)
        returns.append(JobReturn(overrides=list(job_overrides), status=JobStatus.COMPLETED))
    return returns


@contextlib.contextmanager
def _held(*signums):
    """The signals that arrive in the block are delivered when it ends, to the handlers in place before it; one that
    this process ignores (a background job of a shell without job control ignores SIGINT) stays ignored."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread sets handlers
        yield
        return
    arrived = []
    held = [s for s in signums if signal.getsignal(s) is not signal.SIG_IGN]
    previous = {s: signal.signal(s, lambda signum, frame: arrived.append(signum)) for s in held}
    try:
        yield
    finally:  # also when the block raises: a Ctrl-C that made sbatch fail is the stop, not the failure
        for s, handler in previous.items():
            signal.signal(s, handler)
        for signum in dict.fromkeys(arrived):
            signal.raise_signal(signum)


@contextlib.contextmanager
def _hangup_stops():
    """A closed terminal (SIGHUP) stops the jobs as SIGTERM does: they run in sessions of their own
    (hydra_plugins/transfer_submitit_launcher), which the terminal's hangup does not reach, and would train
    on without a command waiting for them. Where SIGHUP is ignored (nohup), the jobs go on as the command does."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGHUP) != signal.SIG_DFL:
        yield
        return
    signal.signal(signal.SIGHUP, signal.getsignal(signal.SIGTERM))
    try:
        yield
    finally:
        signal.signal(signal.SIGHUP, signal.SIG_DFL)


def _no_result(job) -> str | None:
    """Why a local job that has ended has no result, without submitit's wait for one: a local job writes it
    before its process ends, so none will come (the 15 s wait is for a cluster's shared file system)."""
    if type(job).__name__ == "LocalJob" and not job.paths.result_pickle.exists():
        return f"its process ended without one (state {job.state}: killed?)"
    return None


def cancel_jobs(jobs: list, grace_s: float = 30.0, wait_s: float = 30.0) -> None:
    """Stop the jobs still running and wait until they have ended.

    A local job first gets SIGTERM (its controller passes it on; a job in training stops after its step and
    records `interrupted`), and after `grace_s` submitit's own cancel (SIGINT, then SIGKILL to its tasks);
    a cluster's job, the cluster's cancel (scancel) at once.
    """
    running = [job for job in jobs if not job.done()]
    if not running:
        return
    with _held(signal.SIGINT):  # a second Ctrl-C would leave the jobs finishing their step while the folder unlocks
        _cancel(running, grace_s, wait_s)


def _cancel(running: list, grace_s: float, wait_s: float) -> None:
    log.warning("stopping %s still running: %s", count(len(running), "job"), ", ".join(job.job_id for job in running))
    for job in running:
        if type(job).__name__ == "LocalJob":
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(job.job_id), signal.SIGTERM)  # a local job's id is its controller's process id
        else:
            job.cancel(check=False)
    for patience, then_cancel in ((grace_s, True), (wait_s, False)):
        deadline = time.monotonic() + patience
        while running and time.monotonic() < deadline:
            time.sleep(0.1)
            running = [job for job in running if not job.done()]
        for job in running if then_cancel else []:
            job.cancel(check=False)

"""Sweeps through Hydra's launcher plugins: Ray and submitit run the jobs in other processes.

What they leave (records, tables, the exit status) must be what the basic launcher leaves when it
runs the same jobs one after another in the launching process. The plugins are extras
(`.[ray]`, `.[slurm]`, both in `.[dev]`); each test skips when its plugin is absent.
"""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import cache_every_hub_model, run_cli, run_ok
from docs_pages import section, transfer_arguments

ROOT = Path(__file__).resolve().parents[1]
# four jobs of the tiny model, a few steps each, one thread each: two run side by side on two cores
JOBS = ["-m", "seed=1,2", "optimizer.lr=1e-4,1e-3"]
TINY = [
    "max_steps=10", "block_size=32", "micro_batch_size=4", "eval_interval=0", "eval/probes=[]",
    "checkpoint.interval=2", "checkpoint.keep=1", "eval.max_tokens=256", "eval.max_new_tokens=2", "log_interval=1",
    "hardware=cpu", "hardware.num_threads=1", "hardware.estimate_memory=false",
]  # fmt: skip
RAY = ["hydra/launcher=ray", "hydra.launcher.ray.init.num_cpus=2", "hydra.launcher.ray.init.include_dashboard=false"]
# what differs from run to run however the jobs are launched: the table's columns of time and memory
UNSTEADY = ("train_seconds", "warmup_seconds", "tokens_per_second", "steady_tokens_per_second", "samples_per_second",
            "peak_memory_mb",
            "estimated_peak_mb", "checkpoint_mb", "contended", "sweep")  # fmt: skip


def needs(plugin: str) -> None:
    pytest.importorskip(f"hydra_plugins.{plugin}", reason=f"the {plugin} plugin is not installed")


# first in a test's arguments: a test skips before the basic sweep is run for it
@pytest.fixture
def submitit() -> None:
    needs("hydra_submitit_launcher")


@pytest.fixture
def ray() -> None:
    needs("hydra_ray_launcher")


def records(sweep: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(sweep.glob("*/metrics.json"), key=lambda p: int(p.parent.name))]


def assert_same_results(a: dict, b: dict) -> None:
    """Two records of one job: the same config, status, data, losses and metrics (to float tolerance), not timings."""
    for key in ("status", "error", "config", "params", "data", "samples"):
        assert a.get(key) == b.get(key), key
    assert [p["step"] for p in a["train"]["loss_curve"]] == [p["step"] for p in b["train"]["loss_curve"]]
    assert [p["loss"] for p in a["train"]["loss_curve"]] == pytest.approx([p["loss"] for p in b["train"]["loss_curve"]])
    for moment in ("baseline", "final"):
        for split, metrics in b["eval"][moment].items():
            assert a["eval"][moment][split] == pytest.approx(metrics), (moment, split)


def assert_same_sweeps(sweep: Path, basic: Path) -> None:
    import pandas as pd

    ours, theirs = records(sweep), records(basic)
    assert len(ours) == len(theirs) == 4
    for number, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        a["config"]["resume"] = b["config"]["resume"]  # a requeued job continued with resume=true
        assert_same_results(a, b)
        if a["train"]["resumed_from_step"] is None:
            assert_clock_started_in_the_job(sweep / str(number), a)
        assert f"job {number + 1} of 4: " in (sweep / str(number) / "transfer.log").read_text()  # wherever it ran
    for name in ("comparison.csv", "jobs.csv"):  # the tables the sweep's end wrote
        mine, basics = (pd.read_csv(s / "tables" / name) for s in (sweep, basic))
        steady = [c for c in basics.columns if not c.startswith(UNSTEADY)]
        assert list(mine.columns) == list(basics.columns)
        pd.testing.assert_frame_equal(mine[steady], basics[steady], rtol=1e-6)


def assert_clock_started_in_the_job(job: Path, record: dict) -> None:
    """The start-up clock started when the job did, not with the launching process: the record says which clock it
    used (a file's mtime against an event's time would compare two clocks on a loaded machine)."""
    assert record["timing"]["clock_from"] == "job start", job


def run_preempting_job_0(args: list[str], cwd: Path, signum: int = signal.SIGUSR2) -> subprocess.CompletedProcess:
    """A sweep through submitit_local whose job 0 gets submitit's warning signal (USR2) after its first checkpoint,
    or another `signum`."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    command = [sys.executable, "-m", "transfer", *args, "hydra/launcher=submitit_local", "hydra.sweep.dir=sweep"]
    proc = subprocess.Popen(command, cwd=cwd, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    job = cwd / "sweep" / "0"
    try:
        deadline = time.time() + 120
        while not list((job / "checkpoints").glob("step-*[0-9]")) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        os.kill(json.loads((job / ".transfer.lock").read_text())["pid"], signum)
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


@pytest.fixture(scope="module")
def basic(tmp_path_factory) -> Path:
    """The four jobs through Hydra's basic launcher: one after another, in the launching process."""
    root = tmp_path_factory.mktemp("basic")
    run_ok([*JOBS, *TINY, "hydra.sweep.dir=sweep"], root)
    return root / "sweep"


@pytest.mark.slow
def test_a_submitit_local_sweep_with_a_requeued_job_equals_the_basic_one(submitit, basic, tmp_path):
    """Job 0 gets submitit's warning signal (USR2, sent before a time limit or a pre-emption): it stops after a step,
    with a checkpoint; submitit requeues it, and the job, called again in its folder, continues from there."""
    proc = run_preempting_job_0([*JOBS, *TINY], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep = tmp_path / "sweep"
    logs = "".join(p.read_text() for p in (sweep / ".submitit").rglob("*_log.*"))
    assert "Requeued job" in logs, logs[-3000:]
    assert "holds an earlier attempt of this job (interrupted): continuing it" in logs
    requeued = records(sweep)[0]
    assert requeued["status"] == "completed" and requeued["train"]["resumed_from_step"] >= 2
    assert requeued["config"]["resume"] is True
    # and the same training, records and tables as the basic launcher's, where nothing was interrupted
    assert_same_sweeps(sweep, basic)


@pytest.mark.slow
def test_a_ray_sweep_equals_the_basic_one(ray, basic, tmp_path):
    run_ok([*JOBS, *TINY, *RAY, "hydra.sweep.dir=sweep"], tmp_path)
    assert_same_sweeps(tmp_path / "sweep", basic)


def running_in(folder: Path) -> list[str]:
    """The command lines of live processes that name `folder` (submitit's controllers and tasks name the sweep's)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            words = cmdline.read_bytes().decode(errors="replace").split("\0")
        except OSError:  # ended while we looked
            continue
        if any(str(folder) in word for word in words):
            found.append(" ".join(words))
    return found


@pytest.mark.slow
def test_a_killed_submitit_job_leaves_the_other_jobs_tables_and_one_line(submitit, tmp_path):
    """Job 0's process is killed outright (the kernel's out-of-memory killer, a lost node) after its first checkpoint:
    job 1 trains to its end, the tables hold it, one line names job 0, and no job runs on after the command."""
    proc = run_preempting_job_0(["-m", "seed=1,2", *TINY], tmp_path, signal.SIGKILL)
    assert proc.returncode == 1 and "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: 1 of 2 jobs in sweep did not finish: 0: killed while running (its record says running)"
    )
    sweep = tmp_path / "sweep"
    assert running_in(sweep) == []
    assert [r["status"] for r in records(sweep)] == ["running", "completed"]
    import pandas as pd

    table = pd.read_csv(sweep / "tables" / "comparison.csv")
    assert table["status"].tolist() == ["completed", "incomplete"] and table["seeds"].tolist() == [1, 0]
    assert table["val_ppl_after"][0] == records(sweep)[1]["eval"]["final"]["validation"]["perplexity"]


@pytest.mark.slow
def test_ctrl_c_at_the_terminal_stops_a_submitit_sweep_and_its_job(submitit, tmp_path):
    """Ctrl-C at the terminal (SIGINT to the command's process group) once the job has started (its record says
    running): the command stops its job with SIGTERM and exits 130 with one line, the job's record says interrupted.
    The job's controller was in that group: it printed its KeyboardInterrupt traceback, passed the SIGINT on and
    killed the job 1 s later; and the job took the SIGINT and the SIGTERM as two Ctrl-Cs (one stops at once)."""
    args = ["-m", *[a for a in TINY if not a.startswith("max_steps=")], "max_steps=100000",  # it cannot end first
            "hydra/launcher=submitit_local", "hydra.sweep.dir=sweep"]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    # as a terminal starts a command: in a process group of its own, with SIGINT not ignored (a suite started in the
    # background by a script inherits SIGINT ignored, and Python keeps ignoring it: the sweep ran on and exited 0)
    proc = subprocess.Popen([sys.executable, "-m", "transfer", *args], cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    sweep = tmp_path / "sweep"
    try:
        deadline = time.time() + 240
        while not (sweep / "0" / "metrics.json").is_file():
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-3000:]
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
        for controller in (sweep / ".submitit").glob("[0-9]*") if running_in(sweep) else []:  # left by a failure
            with contextlib.suppress(ProcessLookupError):
                os.killpg(int(controller.name), signal.SIGKILL)  # its session: the controller and its task
    assert proc.returncode == 130 and "Traceback" not in out + err, err[-3000:]
    assert err.strip().splitlines()[-1].startswith("interrupted (Ctrl-C); continue with: python -m transfer -m ")
    assert running_in(sweep) == []
    record = records(sweep)[0]  # stopped by the command's SIGTERM alone, the terminal's SIGINT did not reach it
    assert record["status"] == "interrupted" and record["error"] == "interrupted (SIGTERM); resume it with resume=true"
    assert not any("Traceback" in log.read_text() for log in (sweep / ".submitit").glob("*/*_log.err"))


class FakeJob:
    """A submitit job as the launcher sees it: done or not, a result or submitit's error, cancellable."""

    def __init__(self, job_id: str, result=None, error: Exception | None = None, interrupts: bool = False):
        self.job_id, self.result, self.error, self.interrupts = job_id, result, error, interrupts
        self.running, self.cancelled = interrupts, False

    def done(self) -> bool:
        if self.interrupts:  # SIGTERM reaches the launching process while it waits for this job
            self.interrupts = False
            raise KeyboardInterrupt("SIGTERM")
        return not self.running

    def results(self) -> list:
        if self.error:
            raise self.error
        return [self.result]

    def cancel(self, check: bool = True) -> None:
        self.cancelled, self.running = True, False


def test_the_launcher_waits_for_every_job_and_cancels_the_rest_when_stopped():
    from hydra.core.utils import JobStatus
    from submitit.core.utils import UncompletedJobError

    from transfer.sweep.launchers import wait_for_jobs

    died = UncompletedJobError("Job 8 (task: 0) with path /x/8_0_result.pkl\nhas not produced any output")
    jobs = [FakeJob("7", result="job 0's return"), FakeJob("8", error=died), FakeJob("9", result="job 2's return")]
    returns = wait_for_jobs(lambda: jobs, [["seed=1"], ["seed=2"], ["seed=3"]], 0, poll_s=0)
    assert returns[0] == "job 0's return" and returns[2] == "job 2's return"  # the jobs after a dead one count
    assert returns[1].overrides == ["seed=2"] and returns[1].status == JobStatus.COMPLETED  # its record tells
    assert returns[1].return_value is None and not any(job.cancelled for job in jobs)
    jobs = [FakeJob("10", result="done"), FakeJob("11", interrupts=True)]
    with pytest.raises(KeyboardInterrupt):
        wait_for_jobs(lambda: jobs, [["seed=1"], ["seed=2"]], 0, poll_s=0)
    assert [job.cancelled for job in jobs] == [False, True] and not jobs[1].running


def _interrupt(signum, frame):
    raise KeyboardInterrupt("SIGTERM")  # as the command's handler does (cli.main)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_stop_while_the_jobs_are_submitted_cancels_them_once_they_exist(signum):
    """SIGTERM, or the terminal's hangup, after submitit has started the jobs but before it has returned them: the
    stop acts then, and the jobs are cancelled. It used to stop the submission, and the jobs it had started trained on
    to their end after the command had returned (a Ctrl-C does the same: this test sends what no test runner ignores)."""
    from transfer.sweep.launchers import wait_for_jobs

    jobs = [FakeJob("14"), FakeJob("15")]
    for job in jobs:
        job.running = True

    def submit() -> list:
        os.kill(os.getpid(), signum)
        return jobs

    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, _interrupt),
                signal.SIGHUP: signal.signal(signal.SIGHUP, signal.SIG_DFL)}  # fmt: skip
    try:
        with pytest.raises(KeyboardInterrupt):
            wait_for_jobs(submit, [["seed=1"], ["seed=2"]], 0, poll_s=0)
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_DFL  # put back: it stops the jobs only while they run
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    assert [job.cancelled for job in jobs] == [True, True]


def test_a_submitit_job_is_stopped_by_sigterm_from_its_start(submitit, monkeypatch):
    """In the job's process submitit's handler lets SIGTERM pass; a SIGTERM while the plugin composes the job's
    config (before transfer's code ran) was let pass, and the job ran on. The launcher's job stops on it from its
    start, ends its process with 130 and no traceback, and leaves submitit's handlers as they were."""
    from hydra_plugins.transfer_submitit_launcher import launcher

    passed, composed = [], []

    def composing(self, *args):  # the plugin's job: Hydra composes the config, then runs the job
        os.kill(os.getpid(), signal.SIGTERM)
        composed.append(args)
        return "the job's return"

    def bypass(signum, frame):  # submitit's: logs the signal and lets it pass
        passed.append(signum)

    def requeue(signum, frame):
        raise AssertionError("requeued on SIGTERM")

    monkeypatch.setenv("SUBMITIT_EXECUTOR", "local")
    monkeypatch.setattr(launcher.plugin.BaseSubmititLauncher, "__call__", composing)
    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, bypass),
                signal.SIGUSR2: signal.signal(signal.SIGUSR2, requeue)}  # fmt: skip
    try:
        with pytest.raises(SystemExit) as stopped:
            launcher.LocalLauncher()(["seed=1"], "hydra.sweep.dir", 0, "job_id_for_0", {})
        assert stopped.value.code == 130 and passed == [] and composed == []
        assert signal.getsignal(signal.SIGTERM) is bypass and signal.getsignal(signal.SIGUSR2) is requeue
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@pytest.mark.slow
def test_a_failed_job_fails_the_sweep_through_another_process(submitit, tmp_path):
    """The job fails in a submitit process; the launching process learns it from the job's record."""
    bad = "objective.separator='<|nope|>'"  # refused only by the loaded tokenizer, in the job
    proc = run_cli(["-m", *TINY, bad, "hydra/launcher=submitit_local", "hydra.sweep.dir=sweep"], tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: 1 of 1 jobs in sweep did not finish: 0: failed: "), line
    assert "objective.separator='<|nope|>' is no token of this tokenizer" in line
    assert json.loads((tmp_path / "sweep" / "0" / "metrics.json").read_text())["status"] == "failed"


def test_the_exit_status_comes_from_the_records(tmp_path, capsys):
    """Folders as a sweep in other processes leaves them: finished, failed, killed, never started, unreadable."""
    from transfer.config.compose import Plan
    from transfer.sweep.launchers import exit_status

    sweep = tmp_path / "sweep"
    for name, content in {"0": {"status": "completed"}, "1": {"status": "pruned"}, "2": {"status": "dry_run"},
                          "3": {"status": "failed", "error": "ValueError: bad"}, "4": {"status": "running"},
                          "5": {"status": "interrupted", "error": "interrupted (SIGTERM)"}}.items():  # fmt: skip
        (sweep / name).mkdir(parents=True)
        (sweep / name / "metrics.json").write_text(json.dumps(content))
    (sweep / "6" / ".hydra").mkdir(parents=True)  # Hydra made its folder; the job died before its record
    (sweep / "7").mkdir()
    (sweep / "7" / "metrics.json").write_text('{"status": "compl')
    (sweep / "tables").mkdir()  # not a job
    plan = Plan(sweep, True, 9, [], [])  # job 8 never started: no folder at all
    assert exit_status(plan) == 1
    line = capsys.readouterr().err
    assert line == (
        f"error: 6 of 9 jobs in {sweep} did not finish: 3: failed: ValueError: bad; "
        "4: killed while running (its record says running); 5: interrupted: interrupted (SIGTERM); "
        "6: no record (killed, or it never started); 7: unreadable record (Unterminated string starting at: "
        "line 1 column 12 (char 11)); 8: no record (killed, or it never started)\n"
    )
    for name in ("3", "4", "5", "6", "7"):
        (sweep / name / "metrics.json").write_text('{"status": "completed"}')
    assert exit_status(Plan(sweep, True, 8, [], [])) == 0
    assert capsys.readouterr().err == ""
    assert exit_status(Plan(sweep / "3", False, 1, [], [])) == 0  # a single run: its record, no line
    (sweep / "3" / "metrics.json").write_text('{"status": "failed"}')
    assert exit_status(Plan(sweep / "3", False, 1, [], [])) == 1


@pytest.mark.parametrize(
    "launcher,extra,blocked",
    [("ray", "ray", "hydra_plugins.hydra_ray_launcher"), ("submitit_slurm", "slurm", "submitit"),
     ("submitit_local", "slurm", "hydra_plugins.hydra_submitit_launcher")],
)  # fmt: skip
def test_a_launcher_not_installed_is_one_line_naming_its_extra(tmp_path, launcher, extra, blocked):
    """As if the extra were not installed: its module cannot be imported."""
    code = (
        f"import runpy, sys; sys.modules[{blocked!r}] = None; sys.argv[1:] = {['-m', f'hydra/launcher={launcher}']!r}\n"
        "try:\n    runpy.run_module('transfer', run_name='__main__')\n"
        "finally:\n    print('torch' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr == f'error: hydra/launcher={launcher} needs the {extra} extra: pip install -e ".[{extra}]"\n'
    assert proc.stdout == "False\n"  # refused before anything heavy
    assert not (tmp_path / "multirun").exists()


def test_ray_asking_for_a_gpu_on_a_machine_without_one_is_refused(ray, monkeypatch):
    from transfer.config import preflight
    from transfer.config.compose import check_command_line
    from transfer.errors import TransferError

    monkeypatch.setattr(preflight, "cuda_available", lambda: False)
    with pytest.raises(TransferError, match=r"num_gpus=0.5 but this machine has no CUDA GPU, and Ray's local"):
        check_command_line(["-m", *RAY, "hydra.launcher.ray.remote.num_gpus=0.5", "seed=1,2"])
    # a cluster elsewhere has GPUs of its own; GPUs declared to Ray by hand are the user's word
    check_command_line(["-m", *RAY, "hydra.launcher.ray.remote.num_gpus=0.5", "hydra.launcher.ray.init.address=auto"])
    check_command_line(["-m", *RAY, "hydra.launcher.ray.remote.num_gpus=0.5", "hydra.launcher.ray.init.num_gpus=1"])


def test_the_documented_launcher_commands_are_accepted(ray, submitit, monkeypatch, tmp_path):
    """They need GPUs or a SLURM cluster to run; here each is checked as `python -m transfer` checks it first."""
    from transfer.config import preflight
    from transfer.config.compose import check_command_line

    monkeypatch.setattr(preflight, "cuda_available", lambda: True)  # as on the GPU machine they are written for
    # whose hub models are there to load (here: in a cache of their config.json alone, offline)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache_every_hub_model(tmp_path / "hub")))
    commands = transfer_arguments(section("docs/scaling.md", "Parallel and cluster sweeps"))
    assert len(commands) == 5
    for argv in commands:
        plan = check_command_line(argv)
        assert plan is not None and plan.multirun, argv


@pytest.mark.slow
def test_a_submitit_job_of_two_tasks_is_one_job_on_two_processes(submitit, tmp_path):
    """hydra.launcher.tasks_per_node=2: the two tasks of the job join as torchrun's processes would (FSDP2 for full
    fine-tuning), train as one process does, and write one record, one log and one TensorBoard file."""
    from transfer.config.compose import compose_config
    from transfer.run import run_experiment

    args = [*TINY, "max_steps=6", "eval_interval=3", "grad_accum_steps=2"]
    run_ok(["-m", *args, "hydra/launcher=submitit_local", "hydra.launcher.tasks_per_node=2", "hydra.sweep.dir=sweep"],
           tmp_path)  # fmt: skip
    job = tmp_path / "sweep" / "0"
    record = json.loads((job / "metrics.json").read_text())
    assert record["hardware"]["processes"] == 2 and record["hardware"]["distributed"] == "fsdp"
    single = run_experiment(compose_config(args), tmp_path / "one", choices={})
    curve = lambda r: [p["loss"] for p in r["train"]["loss_curve"]]  # noqa: E731
    assert curve(record) == pytest.approx(curve(single), rel=1e-6)
    assert record["eval"]["final"]["test"]["loss"] == pytest.approx(single["eval"]["final"]["test"]["loss"], rel=1e-6)
    assert sorted(p.name for p in (job / "checkpoints" / "step-000006" / "sharded").iterdir()) == [
        ".metadata", "__0_0.distcp", "__1_0.distcp"
    ]  # fmt: skip
    assert len(list(job.glob("events.out.tfevents.*"))) == 1
    assert (job / "transfer.log").read_text().count("baseline validation:") == 1


def test_accumulation_that_does_not_divide_among_a_jobs_tasks_is_one_line(submitit):
    from transfer.config.compose import check_command_line
    from transfer.errors import TransferError

    with pytest.raises(
        TransferError,
        match=r"^grad_accum_steps=3 does not divide among 4 processes \(hydra.launcher.tasks_per_node x nodes\), ",
    ):
        check_command_line(["-m", "hydra/launcher=submitit_slurm", "hydra.launcher.tasks_per_node=2",
                            "hydra.launcher.nodes=2", "grad_accum_steps=3", "seed=1,2"])  # fmt: skip

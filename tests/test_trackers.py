"""The trackers beside TensorBoard (transfer/training/loggers.py): MLflow's store read back with its client, W&B's
offline files read record by record, a resumed run continuing both, and MLflow's UI in a real browser."""

import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import struct
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from conftest import SHORT, made_once, run_ok, skip_or_fail
from omegaconf import OmegaConf

from transfer.config.compose import check_command_line, compose_config
from transfer.errors import TransferError
from transfer.training.loggers import open_loggers


@pytest.fixture(scope="session", autouse=True)
def trackers_installed():
    """The mlflow and wandb extras (in dev): skipped without them, failed under CI=true."""
    for module in ("mlflow", "wandb"):
        if importlib.util.find_spec(module) is None:
            skip_or_fail(f"{module} is not installed (the {module} extra)")


ALL = "logging.loggers=[tensorboard,mlflow,wandb]"
# two jobs that differ in the learning rate, every step logged, validated every 2, a checkpoint halfway
TRACKED = ["-m", *SHORT, "max_steps=8", "eval_interval=2", "log_interval=1", "checkpoint.interval=4",
           "optimizer.lr=1e-4,1e-3", ALL, "hydra.sweep.dir=multirun/tracked"]  # fmt: skip
NAMES = ["0 optimizer.lr=0.0001", "1 optimizer.lr=0.001"]  # the folder and the override the sweep varied


@pytest.fixture(scope="session")
def tracked_sweep(tmp_path_factory) -> Path:
    """The folder the sweep ran in: mlflow.db and mlruns/ there, the sweep in multirun/tracked."""
    return made_once(tmp_path_factory, "tracked_sweep", lambda root: run_ok(TRACKED, root))


def client_of(folder: Path, store: str = "mlflow.db"):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{folder / store}")


def record_of(folder: Path) -> dict:
    return json.loads((folder / "metrics.json").read_text())


def history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_mlflow_holds_the_sweeps_runs_params_scalars_record_and_tables(tracked_sweep, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    client, sweep = client_of(tracked_sweep), tracked_sweep / "multirun" / "tracked"
    experiment = client.get_experiment_by_name("multirun/tracked")  # one experiment, named after the sweep's folder
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert sorted(runs) == [*NAMES, "tables"]
    for job, name in enumerate(NAMES):
        run, folder = runs[name], sweep / str(job)
        record = record_of(folder)
        assert run.info.status == "FINISHED"
        assert json.loads((folder / "trackers.json").read_text())["mlflow"]["run_id"] == run.info.run_id
        # the job's choices and overrides as params (+ the trainable count), as the record has them
        assert {k: run.data.params[k] for k in record["choices"]} == {k: str(v) for k, v in record["choices"].items()}
        assert run.data.params["optimizer.lr"] == ("0.0001", "0.001")[job]
        assert run.data.params["trainable_params"] == str(record["params"]["trainable"])
        # every scalar TensorBoard got, with its tag, at its steps
        events = EventAccumulator(str(folder))
        events.Reload()
        tags = events.Tags()["scalars"]
        assert set(run.data.metrics) == set(tags) and len(tags) > 10
        for tag in tags:
            tensorboard = [(e.step, e.value) for e in events.Scalars(tag)]
            assert history(client, run.info.run_id, tag) == [(s, pytest.approx(v, rel=1e-6)) for s, v in tensorboard]
        # and what the record says of them
        assert history(client, run.info.run_id, "train/loss") == [
            (p["step"], pytest.approx(p["loss"], rel=1e-6)) for p in record["train"]["loss_curve"]
        ]
        assert [s for s, _ in history(client, run.info.run_id, "validation/loss")] == [0, 2, 4, 6, 8]
        # the record as the job ended, its Hydra config and samples as artifacts
        kept = Path(client.download_artifacts(run.info.run_id, "metrics.json", str(tmp_path / str(job))))
        assert json.loads(kept.read_text()) == record and record["status"] == "completed"
        assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"metrics.json", "hydra", "samples"}
    # the sweep's tables, in a run of their own
    tables = client.download_artifacts(runs["tables"].info.run_id, "tables", str(tmp_path / "tables"))
    made = sorted(p.relative_to(sweep / "tables") for p in (sweep / "tables").rglob("*") if p.is_file())
    assert sorted(p.relative_to(tables) for p in Path(tables).rglob("*") if p.is_file()) == made and made


def wandb_records(path: Path) -> list:
    """The records of a W&B run file (`run-<id>.wandb`): LevelDB's log format (32 KiB blocks of chunks, each with a
    7-byte header: checksum, length, type: 1 whole, 2 first, 3 middle, 4 last) after W&B's own 7-byte header,
    each record a wandb_internal_pb2.Record. A file cut short (a killed run) ends at its last whole record."""
    from wandb.proto import wandb_internal_pb2

    data, records, position, pieces = path.read_bytes(), [], 7, b""
    assert data[:4] == b":W&B"
    while position + 7 <= len(data):
        if 32768 - position % 32768 < 7:  # a block's tail too short for a header is padding
            position += 32768 - position % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        chunk = data[position + 7 : position + 7 + length]
        if kind == 0 or len(chunk) < length:  # zeros, or cut short
            break
        position += 7 + length
        pieces = chunk if kind in (1, 2) else pieces + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces)
            records.append(record)
    return records


def wandb_history(path: Path, key: str) -> list[tuple[int, float]]:
    points = []
    for record in wandb_records(path):
        if record.WhichOneof("record_type") == "history":
            items = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item}
            if key in items:
                points.append((record.history.step.num, items[key]))
    return points


def wandb_run(path: Path):
    return next(r.run for r in wandb_records(path) if r.WhichOneof("record_type") == "run")


def test_wandb_writes_offline_files_in_the_run_folder_with_the_scalars_and_params(tracked_sweep):
    sweep = tracked_sweep / "multirun" / "tracked"
    for job, name in enumerate(NAMES):
        folder = sweep / str(job)
        record = record_of(folder)
        (offline,) = (folder / "wandb").glob("offline-run-*")  # offline: nothing left the machine
        run_id = json.loads((folder / "trackers.json").read_text())["wandb"]["id"]
        (file,) = offline.glob(f"run-{run_id}.wandb")
        run = wandb_run(file)
        assert (run.run_id, run.display_name, run.run_group, run.project) == (
            run_id,
            name,
            "multirun/tracked",
            "transfer",
        )
        config = {u.key: json.loads(u.value_json) for u in run.config.update}
        assert config["optimizer.lr"] == ("0.0001", "0.001")[job] and config["strategy"] == "full"
        assert wandb_history(file, "train/loss") == [
            (p["step"], pytest.approx(p["loss"], rel=1e-6)) for p in record["train"]["loss_curve"]
        ]
        validation = [record["eval"]["baseline"]["validation"]["loss"]]
        validation += [p["loss"] for p in record["train"]["validation_curve"]]
        assert wandb_history(file, "validation/loss") == list(zip([0, 2, 4, 6, 8], validation, strict=True))


def test_a_resumed_job_continues_its_mlflow_and_wandb_runs(tracked_sweep, tmp_path):
    for part in ("multirun", "mlruns", "mlflow.db"):  # the folder the sweep ran in, copied
        (shutil.copytree if (tracked_sweep / part).is_dir() else shutil.copy)(tracked_sweep / part, tmp_path / part)
    job = tmp_path / "multirun" / "tracked" / "1"
    kept, record = json.loads((job / "trackers.json").read_text()), record_of(job)
    run_id = kept["mlflow"]["run_id"]
    # as a job killed right after its checkpoint of step 4 leaves its folder and the store
    shutil.rmtree(job / "checkpoints" / "step-000008")
    (job / "metrics.json").write_text(json.dumps({**record, "status": "running"}))
    with sqlite3.connect(tmp_path / "mlflow.db") as db:
        for table, column in (("experiments", "artifact_location"), ("runs", "artifact_uri")):  # the copy's
            db.execute(f"UPDATE {table} SET {column} = replace({column}, ?, ?)", (str(tracked_sweep), str(tmp_path)))
        db.execute("UPDATE runs SET status = 'RUNNING', end_time = NULL WHERE run_uuid = ?", (run_id,))
        db.execute("DELETE FROM metrics WHERE run_uuid = ? AND step > 4", (run_id,))
        db.execute("DELETE FROM latest_metrics WHERE run_uuid = ?", (run_id,))
        db.execute("INSERT INTO latest_metrics SELECT key, value, timestamp, step, is_nan, run_uuid FROM metrics "
                   "WHERE run_uuid = ?1 AND (key, step) IN "
                   "(SELECT key, max(step) FROM metrics WHERE run_uuid = ?1 GROUP BY key)", (run_id,))  # fmt: skip
    run_ok([*TRACKED, "resume=true"], tmp_path)
    again = record_of(job)
    assert again["status"] == "completed" and again["train"]["resumed_from_step"] == 4
    assert json.loads((job / "trackers.json").read_text()) == kept  # the same runs
    client = client_of(tmp_path)
    runs = client.search_runs([client.get_experiment_by_name("multirun/tracked").experiment_id])
    assert sorted(r.info.run_name for r in runs) == [*NAMES, "tables"]  # no new run, the tables' run again
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    # steps 1 to 4 the killed job's, 5 to 8 appended by the resumed one, each once
    assert history(client, run_id, "train/loss") == [
        (p["step"], pytest.approx(p["loss"], rel=1e-6)) for p in again["train"]["loss_curve"]
    ]
    assert [p["step"] for p in again["train"]["loss_curve"]] == list(range(1, 9))
    assert [s for s, _ in history(client, run_id, "validation/loss")] == [0, 2, 4, 6, 8]
    assert json.loads(Path(client.download_artifacts(run_id, "metrics.json", str(tmp_path))).read_text()) == again
    # W&B: a second offline file of the same run id, from the step after the checkpoint
    (first, resumed) = sorted(job.glob("wandb/offline-run-*/run-*.wandb"))
    assert first.name == resumed.name == f"run-{kept['wandb']['id']}.wandb"
    assert wandb_run(resumed).run_id == kept["wandb"]["id"]
    assert [s for s, _ in wandb_history(resumed, "train/loss")] == [5, 6, 7, 8]


def test_mlflow_logs_each_step_once_across_a_resume_and_a_restart_is_a_new_run(tracked_sweep, tmp_path):
    shutil.copy(tracked_sweep / "mlflow.db", tmp_path / "m.db")  # a store with its tables made: 10 s less
    cfg = compose_config(["logging.loggers=[mlflow]", f"logging.mlflow.tracking_uri=sqlite:///{tmp_path}/m.db"])
    folder = tmp_path / "run"
    killed = open_loggers(cfg, folder, params={"optimizer.lr": "1e-3", "+experiment": "x"})  # never closed
    for step in range(1, 8):  # killed after step 7; its checkpoint holds step 5
        killed.scalars({"train/loss": float(step)}, step)
    with open_loggers(cfg, folder, resumed_step=5, params={"optimizer.lr": "1e-3"}) as resumed:
        for step in range(6, 11):
            resumed.scalars({"train/loss": 100.0 + step}, step)
    client = client_of(tmp_path, "m.db")
    (run,) = client.search_runs([client.get_experiment_by_name("single runs").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params == {"optimizer.lr": "1e-3", "experiment": "x"}
    # the killed run's points after the checkpoint stand (a resume retraces them exactly); no step twice
    assert history(client, run.info.run_id, "train/loss") == [(s, float(s)) for s in range(1, 8)] + [
        (s, 100.0 + s) for s in range(8, 11)
    ]
    # started again from step 0 (no checkpoint): a new run, and the earlier one, killed, says so
    restarted = open_loggers(cfg, folder)
    restarted.close(KeyboardInterrupt())
    runs = {r.info.run_id: r.info.status for r in client.search_runs([run.info.experiment_id])}
    assert runs == {run.info.run_id: "FINISHED", restarted.loggers[0].run_id: "KILLED"}


def test_a_tracker_without_its_extra_is_refused_in_one_line(monkeypatch):
    from transfer.config import preflight

    installed = preflight.installed
    monkeypatch.setattr(preflight, "installed", lambda module: module != "wandb" and installed(module))
    with pytest.raises(TransferError) as e:
        check_command_line(["logging.loggers=[tensorboard,wandb]"])
    assert str(e.value) == 'logging.loggers names wandb, which needs the wandb extra: pip install -e ".[wandb]"'
    check_command_line(["logging.loggers=[tensorboard,mlflow]"])  # the one installed passes


# ---------------------------------------------------------------- MLflow's UI in headless Chromium
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_ui(tracked_sweep, tmp_path):
    """`mlflow server` on a free localhost port against the sweep's store, answering; killed at the end."""
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job runner: the UI alone
    command = ["mlflow", "server", "--backend-store-uri", f"sqlite:///{tracked_sweep / 'mlflow.db'}",
               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]  # fmt: skip
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(command, cwd=tracked_sweep, env=env, stdout=log, stderr=log, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2)
                break
            except OSError:
                assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
                assert time.time() < deadline, "mlflow server did not answer in 180 s"
                time.sleep(0.5)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # its uvicorn worker too
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


def chromium(*args: str) -> subprocess.CompletedProcess:
    """Headless Chromium; the UI is a JS app, which renders within the virtual time (its requests pause it)."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        skip_or_fail("no chromium (Debian's chromium package) for the browser test of MLflow's UI")
    command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               "--virtual-time-budget=20000", "--window-size=1800,1050", *args]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)


@pytest.mark.slow  # a server and three browsers
def test_mlflow_ui_in_chromium_shows_the_sweeps_runs_and_their_curves(tracked_sweep, mlflow_ui, tmp_path):
    client = client_of(tracked_sweep)
    experiment = client.get_experiment_by_name("multirun/tracked").experiment_id
    runs = {r.info.run_name: r.info.run_id for r in client.search_runs([experiment])}
    # the experiment's runs page (MLflow's JS routes: /#/experiments/<id>/runs)
    page = chromium("--dump-dom", f"{mlflow_ui}/#/experiments/{experiment}/runs").stdout
    assert all(name in page for name in NAMES) and "multirun/tracked" in page
    # the metric page of both runs, as the UI links it (getMetricPageRoute): a chart of two curves, each run named
    keys = ["validation/loss", "train/loss"]
    query = {"runs": [runs[n] for n in NAMES], "metric": keys[0], "experiments": [experiment],
             "plot_metric_keys": keys, "plot_layout": {}, "x_axis": "step", "y_axis_scale": "linear",
             "line_smoothness": 1, "show_point": True, "deselected_curves": [], "last_linear_y_axis_range": []}  # fmt: skip
    metric = f"{mlflow_ui}/#/metric?" + "&".join(
        f"{k}={urllib.parse.quote(v if isinstance(v, str) and k == 'x_axis' else json.dumps(v))}"
        for k, v in query.items()
    )
    page = chromium("--dump-dom", metric).stdout
    assert "validation/loss vs train/loss" in page and all(name in page for name in NAMES)
    curves = set(re.findall(r'<path class="js-line" d="(M[^"]+)"', page))  # Plotly's lines, each drawn twice
    assert len(curves) == 4 and all("L" in curve for curve in curves)  # 2 runs x 2 metrics, each a line
    shot = tmp_path / "mlflow_ui.png"
    chromium(f"--screenshot={shot}", metric)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", shot.read_bytes()[16:24]) == (1800, 1050)
    if os.environ.get("MLFLOW_UI_SCREENSHOT"):  # how docs/figures/mlflow_ui.png is made
        shutil.copy(shot, os.environ["MLFLOW_UI_SCREENSHOT"])


def test_resume_compares_no_tracker_setting():
    """Where curves go does not change what is trained: a checkpoint saved before the trackers' settings existed, or
    with other trackers, resumes."""
    from transfer.config.folders import config_differences

    cfg = compose_config([ALL, "logging.mlflow.tracking_uri=http://127.0.0.1:5000"])
    older = OmegaConf.to_container(compose_config([]), resolve=True, enum_to_str=True)
    older["logging"] = {"loggers": ["tensorboard"]}  # as records and checkpoints wrote it before
    assert config_differences(older, cfg) == []
    assert config_differences(older, compose_config(["max_steps=7"])) == [("max_steps", 200, 7)]

"""Where a run's curves and summaries go: the trackers named in `logging.loggers`, behind one seam.

The loop and the run speak to a `MetricLogger` only: scalars by step, a text, the hyper-parameters against the
results, close. Rank 0 alone logs (the others get one that does nothing), and several trackers at once are one
fan-out. TensorBoard, the default, writes its event files into the run's folder.

A new tracker is a class here with those four methods, its name in `LOGGERS` and in `config.schema.Logger`, and its
library as an optional extra of pyproject.toml (config.checks.TRACKER_EXTRAS), imported in its constructor.

MLflow (docs/trackers.md): a job is a run, named after its folder and the overrides its sweep varied, with its choices
and overrides as params; a sweep is an experiment. The store is MLflow's own default, sqlite:///mlflow.db in the folder
the command ran in: no server to start, several sweeps side by side in one store, and `mlflow ui` started in that
folder shows them; logging.mlflow.tracking_uri names another (a server). W&B: an offline run under the run's folder.

A resumed run continues the tracker's run: its id is kept in the job's folder (trackers.json), which travels with the
checkpoint it resumes from, so that a sweep moved or copied elsewhere still finds it, and no search of the store is
needed. MLflow keeps every point it was given: what the killed run logged after its checkpoint's step stays, and the
resumed run, retracing the same steps (resume is exact), logs from the step after each curve's last.
"""

import contextlib
import fcntl
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from omegaconf import OmegaConf

from transfer.training import distributed

log = logging.getLogger(__name__)
IDS = "trackers.json"  # in the job's folder: each tracker's run, which a resumed job continues


class MetricLogger(Protocol):
    def scalars(self, values: dict[str, float], step: int) -> None: ...  # {tag: value} at a training step

    def text(self, tag: str, text: str, step: int | None = None) -> None: ...  # None: of the run, not a step

    def hparams(self, params: dict, metrics: dict[str, float]) -> None: ...  # the choices against the results

    def close(self, error: BaseException | None = None) -> None: ...  # error: what ended the run, if it failed


@dataclass
class Job:
    """The run the loggers write for."""

    folder: Path
    resumed_step: int | None = None  # the step its checkpoint holds, when it resumes
    params: dict = field(default_factory=dict)  # its choices and overrides: what trackers compare runs by
    overrides: list[str] = field(default_factory=list)  # as given on the command line (hydra's task overrides)
    sweep: Path | None = None  # the sweep's folder, for a sweep's job

    def name(self, cwd: Path) -> str:
        """A sweep's job: its folder in the sweep and the overrides the sweep varied (`1 optimizer.lr=1e-3`); a single
        run: its folder."""
        if self.sweep is None:
            return _shown(self.folder, cwd)
        from hydra.core.override_parser.overrides_parser import OverridesParser

        parser = OverridesParser.create()
        try:  # the sweep's command line: a key set there to one value is every job's
            given = parser.parse_overrides(list(OmegaConf.load(self.sweep / "multirun.yaml").hydra.overrides.task))
            common = {o.key_or_group for o in given if not o.is_sweep_override()}
        except Exception:  # hydra.output_subdir=null writes none: the folder alone
            common = {o.key_or_group for o in parser.parse_overrides(list(self.overrides))}
        varied = [o.input_line for o in parser.parse_overrides(list(self.overrides)) if o.key_or_group not in common]
        return " ".join([_shown(self.folder, self.sweep), *varied])


def _shown(folder: Path, under: Path) -> str:
    """`folder` relative to `under` where it lies there, else in full."""
    folder = Path(folder).absolute()
    return str(folder.relative_to(under.absolute())) if folder.is_relative_to(under.absolute()) else str(folder)


def launch_folder() -> Path:
    """The folder the command ran in (Hydra's runtime.cwd: a launcher's job may run elsewhere)."""
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.cwd) if HydraConfig.initialized() else Path.cwd()


def experiment_name(settings, sweep: Path | None, cwd: Path) -> str:
    """logging.mlflow.experiment; else the sweep's folder (relative to where the command ran), or "single runs"."""
    if settings.mlflow.experiment:
        return settings.mlflow.experiment
    return _shown(sweep, cwd) if sweep is not None else "single runs"


def mlflow_uri(settings, cwd: Path) -> str:
    return settings.mlflow.tracking_uri or f"sqlite:///{(cwd / 'mlflow.db').absolute()}"


def _read_ids(folder: Path) -> dict:
    path = Path(folder) / IDS
    return json.loads(path.read_text()) if path.is_file() else {}


def _keep_id(folder: Path, tracker: str, ids: dict) -> None:
    kept = _read_ids(folder)
    kept[tracker] = ids
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / IDS).write_text(json.dumps(kept, indent=2) + "\n")


class TensorBoard:
    """Event files in the run's folder. A resumed run hides what the killed one logged after its checkpoint's step
    (purge_step); a run started again in its folder, all of the earlier one's."""

    def __init__(self, settings, job: Job):
        from torch.utils.tensorboard import SummaryWriter

        purge_step = 0 if job.resumed_step is None else job.resumed_step + 1
        self.writer = SummaryWriter(log_dir=str(job.folder), purge_step=purge_step)

    def scalars(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def text(self, tag: str, text: str, step: int | None = None) -> None:
        self.writer.add_text(tag, text, step)

    def hparams(self, params: dict, metrics: dict[str, float]) -> None:
        from torch.utils.tensorboard.summary import hparams

        for summary in hparams(params, metrics):  # the HParams dashboard: experiment, session start and end
            self.writer.file_writer.add_summary(summary)

    def close(self, error: BaseException | None = None) -> None:
        self.writer.close()


@contextlib.contextmanager
def _store_lock(uri: str):
    """A sweep's jobs open the store at once, and the first to find a new SQLite store makes its tables: one at a
    time (a lock file beside it)."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    path = Path(uri.removeprefix("sqlite:///"))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{path}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _experiment(client, name: str) -> str:
    """The id of the experiment `name`, made if there is none."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException:  # another job's, made meanwhile (a server: no lock)
        return client.get_experiment_by_name(name).experiment_id


def _param_key(key: str) -> str:
    """MLflow's allowed characters: a Hydra override's +/~ prefix dropped, others as _ (`+experiment` -> experiment)."""
    return re.sub(r"[^\w\-. /:]", "_", str(key).lstrip("+~"))[:250]


class MLflow:
    """One MLflow run per job (the module's docstring: the store, the experiment, the resume)."""

    def __init__(self, settings, job: Job):
        from mlflow.tracking import MlflowClient

        cwd = launch_folder()
        self.folder = job.folder
        self.client = MlflowClient(tracking_uri=mlflow_uri(settings, cwd))
        self.logged: dict[str, int] = {}  # each metric's last step in the store: a resumed run logs after it
        self.params: dict[str, str] = {}
        kept = _read_ids(job.folder).get("mlflow")
        with _store_lock(self.client.tracking_uri):
            self.run_id = self._continued(kept, job.resumed_step)
            if self.run_id is None:
                experiment = _experiment(self.client, experiment_name(settings, job.sweep, cwd))
                tags = {"transfer.folder": str(Path(job.folder).absolute())}
                self.run_id = self.client.create_run(experiment, run_name=job.name(cwd), tags=tags).info.run_id
                _keep_id(job.folder, "mlflow", {"run_id": self.run_id, "tracking_uri": self.client.tracking_uri})
        self.hparams(job.params, {})

    def _continued(self, kept: dict | None, resumed_step: int | None) -> str | None:
        """The kept run's id when the job resumes from a checkpoint and the store holds it; else None (a new run)."""
        from mlflow.exceptions import MlflowException

        if not kept:
            return None
        try:
            run = self.client.get_run(kept["run_id"])
        except MlflowException:
            if resumed_step is not None:
                log.warning("MLflow run %s is not in %s: a new run", kept["run_id"], self.client.tracking_uri)
            return None
        if resumed_step is None:  # started again from step 0: the earlier run stays as it ended
            if run.info.status == "RUNNING":  # it was killed
                self.client.set_terminated(run.info.run_id, "KILLED")
            return None
        self.client.update_run(run.info.run_id, status="RUNNING")
        for key in run.data.metrics:
            self.logged[key] = max(m.step for m in self.client.get_metric_history(run.info.run_id, key))
        self.params = dict(run.data.params)
        return run.info.run_id

    def scalars(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, step) for k, v in values.items() if step > self.logged.get(k, -1)]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def text(self, tag: str, text: str, step: int | None = None) -> None:
        where = tag if step is None else f"{tag}/step-{step}"
        self.client.log_text(self.run_id, text, f"{where}.md")

    def hparams(self, params: dict, metrics: dict[str, float]) -> None:
        """The params it lacks (MLflow's cannot change); `metrics` come as scalars at the last step (run._log_final)."""
        from mlflow.entities import Param

        new = {_param_key(k): str(v)[:6000] for k, v in params.items()}
        new = {k: v for k, v in new.items() if k not in self.params}
        if new:
            self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in new.items()])
            self.params.update(new)

    def close(self, error: BaseException | None = None) -> None:
        """The record as it ended (metrics.json) and the job's Hydra config as artifacts; the run's status."""
        record, hydra = Path(self.folder) / "metrics.json", Path(self.folder) / ".hydra"
        if record.is_file():
            self.client.log_artifact(self.run_id, str(record))
        if hydra.is_dir():
            self.client.log_artifacts(self.run_id, str(hydra), "hydra")
        status = "FINISHED" if error is None else "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
        self.client.set_terminated(self.run_id, status)


def log_sweep_tables(cfg, sweep: Path, cwd: Path) -> None:
    """The sweep's tables/ as artifacts of a run named "tables" in the sweep's MLflow experiment (MLflow keeps no file
    of an experiment's own); a resumed sweep's end replaces them in the same run."""
    if not (sweep / "tables").is_dir():
        return
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_uri(cfg.logging, cwd))
    with _store_lock(client.tracking_uri):
        experiment = _experiment(client, experiment_name(cfg.logging, sweep, cwd))
        # this sweep's, as named where it ran (logging.mlflow.experiment may put several sweeps in one experiment)
        tags = {"transfer.tables": "true", "transfer.sweep": _shown(sweep, cwd)}
        found = client.search_runs([experiment], " and ".join(f"tags.`{k}` = {v!r}" for k, v in tags.items()))
        tags["transfer.folder"] = str(sweep.absolute())
        run_id = (
            found[0].info.run_id if found else client.create_run(experiment, run_name="tables", tags=tags).info.run_id
        )
    client.log_artifacts(run_id, str(sweep / "tables"), "tables")
    client.set_terminated(run_id)


class WandB:
    """A W&B run, offline unless WANDB_MODE says otherwise: its files in <run>/wandb/offline-run-*, which
    `wandb sync` uploads. A sweep's jobs are a group named after its folder."""

    def __init__(self, settings, job: Job):
        import wandb

        cwd = launch_folder()
        kept = _read_ids(job.folder).get("wandb") if job.resumed_step is not None else None
        self.run = wandb.init(
            dir=str(job.folder), id=(kept or {}).get("id"), resume="allow" if kept else None,
            project=settings.wandb.project, entity=settings.wandb.entity, name=job.name(cwd), config=job.params,
            group=_shown(job.sweep, cwd) if job.sweep is not None else None,
            mode=None if os.environ.get("WANDB_MODE") else "offline",
            settings=wandb.Settings(console="off", silent=True),  # the run's own log has what it prints
        )  # fmt: skip
        _keep_id(job.folder, "wandb", {"id": self.run.id})

    def scalars(self, values: dict[str, float], step: int) -> None:
        self.run.log(dict(values), step=step)

    def text(self, tag: str, text: str, step: int | None = None) -> None:
        self.run.summary[tag] = text  # W&B has no text panel; the summary shows it with the run

    def hparams(self, params: dict, metrics: dict[str, float]) -> None:
        self.run.config.update(params, allow_val_change=True)
        self.run.summary.update(metrics)

    def close(self, error: BaseException | None = None) -> None:
        offline = self.run.settings.mode == "offline"
        where = self.run.settings.sync_dir
        self.run.finish(exit_code=0 if error is None else 1)
        if offline:
            log.info("W&B offline run in %s; upload it with: wandb sync %s", where, where)


# logging.loggers names -> class(cfg.logging, the job)
LOGGERS = {"tensorboard": TensorBoard, "mlflow": MLflow, "wandb": WandB}


def _names(cfg) -> list[str]:
    return list(dict.fromkeys(getattr(kind, "value", kind) for kind in cfg.logging.loggers))  # an Enum of the schema


class Loggers:
    """Every logger of the run at once (none: logging off, and on every rank but 0); a context manager that closes
    them, telling them what ended the run if it failed."""

    def __init__(self, loggers: list[MetricLogger] = ()):
        self.loggers = list(loggers)

    def scalars(self, values: dict[str, float], step: int) -> None:
        for logger in self.loggers:
            logger.scalars(values, step)

    def text(self, tag: str, text: str, step: int | None = None) -> None:
        for logger in self.loggers:
            logger.text(tag, text, step)

    def hparams(self, params: dict, metrics: dict[str, float]) -> None:
        for logger in self.loggers:
            logger.hparams(params, metrics)

    def close(self, error: BaseException | None = None) -> None:
        for logger in self.loggers:
            logger.close(error)

    def __enter__(self) -> "Loggers":
        return self

    def __exit__(self, kind, error, traceback) -> None:
        self.close(error)


def open_loggers(cfg, folder: Path, resumed_step: int | None = None, params: dict | None = None,
                 overrides: list[str] = (), sweep: Path | None = None) -> Loggers:  # fmt: skip
    """The loggers `cfg.logging.loggers` names, writing for `folder`'s run; `resumed_step`: the step its checkpoint
    holds, when it resumes (what was logged after it is the killed run's); `params`: the job's choices and overrides,
    `overrides` as given; `sweep`: the sweep's folder, for a sweep's job."""
    if not distributed.is_main():
        return Loggers()
    job = Job(Path(folder), resumed_step, dict(params or {}), list(overrides), sweep)
    opened = Loggers()
    try:
        for name in _names(cfg):
            opened.loggers.append(LOGGERS[name](cfg.logging, job))
    except BaseException as e:  # a tracker that cannot start (a server down): the ones opened close, failed
        opened.close(e)
        raise
    return opened


def scalars_of(prefix: str, result: dict) -> dict[str, float]:
    """An evaluation's float metrics as tags `<prefix>/<metric>` (validation/loss, ref_wikitext/perplexity)."""
    return {f"{prefix}/{key}": value for key, value in result.items() if isinstance(value, float)}

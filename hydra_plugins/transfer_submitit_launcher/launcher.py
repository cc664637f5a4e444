"""The submitit plugin's launchers, waiting for every job of a batch however it ends.

The plugin asks each job for its result in turn, and the first job that died (killed, out of
memory, cancelled on the cluster) raises submitit's UncompletedJobError out of the sweep: a
traceback, no tables for the jobs that finished, no exit line, and the jobs still running left to
train after the command has returned. These launch the same jobs the same way, then wait for them
all (transfer.sweep.launchers.wait_for_jobs); how each ended is read from its record, as for any launcher.
transfer.sweep.callbacks.LauncherCallback puts them in the plugin's place when a sweep starts.

A stop reaches the jobs from the launching process alone: it sends each SIGTERM (cancel_jobs), which a
job obeys from the first line of its own code (job()). A local job's controller starts in a session of its
own, so that a Ctrl-C at the terminal does not reach it and its job too: the controller printed its
KeyboardInterrupt traceback there, passed the SIGINT on and killed the job 1 s later, and a job in training
took the SIGINT and the sweep's SIGTERM as a second Ctrl-C and stopped without its checkpoint.
"""

import contextlib
import logging
import subprocess
import sys
from pathlib import Path

from hydra.core.singleton import Singleton
from hydra.core.utils import filter_overrides
from omegaconf import OmegaConf

try:
    from hydra_plugins.hydra_submitit_launcher import config as plugin_config
    from hydra_plugins.hydra_submitit_launcher import submitit_launcher as plugin
except ImportError:  # the slurm extra is not installed: hydra/launcher=submitit_* is refused at start-up
    plugin = None

log = logging.getLogger(__name__)


def launch(self, job_overrides, initial_job_idx: int):
    """The plugin's launch (hydra-submitit-launcher 1.2), but for its last step: every job waited for."""
    import os

    import submitit

    from transfer.sweep.launchers import wait_for_jobs

    params = self.params
    init_params = {"folder": params["submitit_folder"]}
    specific = {"max_num_timeout"}
    init_params.update({f"{self._EXECUTOR}_{k}": v for k, v in params.items() if k in specific})
    executor = submitit.AutoExecutor(cluster=self._EXECUTOR, **init_params)
    base = set(OmegaConf.structured(plugin_config.BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"{self._EXECUTOR}_{k}": v for k, v in params.items()
                                  if k not in specific | {"submitit_folder"}})  # fmt: skip
    log.info(f"Submitit '{self._EXECUTOR}' sweep output dir : {self.config.hydra.sweep.dir}")
    sweep_dir = Path(str(self.config.hydra.sweep.dir))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    if "mode" in self.config.hydra.sweep:
        os.chmod(sweep_dir, mode=int(str(self.config.hydra.sweep.mode), 8))
    job_params = []
    for number, overrides in enumerate(job_overrides, start=initial_job_idx):
        log.info(f"\t#{number} : {' '.join(filter_overrides(overrides))}")
        job_params.append((list(overrides), "hydra.sweep.dir", number, f"job_id_for_{number}", Singleton.get_state()))

    def submit() -> list:
        with _own_sessions() if self._EXECUTOR == "local" else contextlib.nullcontext():
            return executor.map_array(self, *zip(*job_params, strict=True))

    return wait_for_jobs(submit, job_overrides, initial_job_idx)


def job(self, *args):
    """The plugin's job, in the job's process: a stop (SIGTERM) interrupts it from here on, before Hydra composes
    its config. submitit's own handler, in place until then, let SIGTERM pass: a job stopped while it started ran
    on until the cancel cancel_jobs sends after 30 s. The job's record says it was interrupted; its process ends
    with 130, without KeyboardInterrupt's traceback in its submitit log (a requeue ends it as submitit does)."""
    from transfer.sweep.launchers import requeue_when_preempted

    try:
        with requeue_when_preempted():
            return plugin.BaseSubmititLauncher.__call__(self, *args)
    except KeyboardInterrupt:
        sys.exit(130)


class _NewSession:
    """The subprocess module, as submitit's local executor sees it: what it starts begins a session of its own."""

    def __getattr__(self, name: str):
        return getattr(subprocess, name)

    @staticmethod
    def Popen(*args, **kwargs):  # noqa: N802 (subprocess's name)
        return subprocess.Popen(*args, **{**kwargs, "start_new_session": True})


@contextlib.contextmanager
def _own_sessions():
    """The local jobs' controllers started in sessions of their own (submitit starts them with subprocess.Popen,
    which takes no other option from its caller)."""
    from submitit.local import local

    local.subprocess = _NewSession()
    try:
        yield
    finally:
        local.subprocess = subprocess


if plugin is not None:

    class LocalLauncher(plugin.LocalLauncher):
        launch = launch
        __call__ = job

    class SlurmLauncher(plugin.SlurmLauncher):
        launch = launch
        __call__ = job

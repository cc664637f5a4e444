"""Hydra callbacks. Hydra builds them at the start of every run, single ones too, so this
module imports nothing heavy: pandas and the aggregator load only when a sweep ends."""

import logging
from pathlib import Path

from hydra.experimental.callback import Callback

from transfer.errors import TransferError

log = logging.getLogger(__name__)


class TablesCallback(Callback):
    """Aggregate a sweep when it ends (config key `tables_after_sweep`)."""

    def on_multirun_end(self, config, **kwargs) -> None:
        if not config.get("tables_after_sweep", True):
            return
        from transfer.aggregate.output import aggregate
        from transfer.aggregate.tables import for_people, markdown, under_table

        sweep = Path(config.hydra.sweep.dir)
        try:
            _, table, _ = aggregate([sweep])
            pretty = for_people(table)
            _to_trackers(config, sweep)  # before printing: a reader that has left (| head) ends the printing
            print(markdown(pretty) + f"\n\n{under_table(table, pretty.columns)}")
            print(f"\ntables and plots in {sweep / 'tables'}")
        except TransferError as e:
            log.warning("no tables for %s: %s", sweep, e)
        except BrokenPipeError:  # the tables are written; only their printing found no reader
            pass
        except Exception as e:  # the jobs' records stand; `python -m transfer.aggregate` can try again
            log.warning("no tables for %s: %s: %s (python -m transfer.aggregate %s)", sweep, type(e).__name__, e, sweep)


def _to_trackers(config, sweep: Path) -> None:
    """The tables as artifacts of the sweep's MLflow experiment, when logging.loggers names mlflow; a store that
    cannot take them leaves the tables in the sweep's folder, said in one line."""
    if "mlflow" not in [getattr(kind, "value", kind) for kind in config.logging.loggers]:
        return
    from transfer.training.loggers import log_sweep_tables

    cwd = Path(config.hydra.runtime.cwd)
    try:
        log_sweep_tables(config, cwd / sweep, cwd)
    except Exception as e:
        log.warning("the tables are not in MLflow: %s: %s", type(e).__name__, str(e).splitlines()[0])


# the submitit plugin's launchers, and ours in their place (hydra_plugins/transfer_submitit_launcher)
SUBMITIT = {
    f"hydra_plugins.hydra_submitit_launcher.submitit_launcher.{name}": (
        f"hydra_plugins.transfer_submitit_launcher.launcher.{name}"
    )
    for name in ("LocalLauncher", "SlurmLauncher")
}


class LauncherCallback(Callback):
    """hydra/launcher=submitit_local or submitit_slurm: the sweep's launcher is ours, which waits for every job.

    The plugin's stops at the first job that died, with a traceback and the other jobs left running
    (hydra_plugins/transfer_submitit_launcher). Its settings stay the plugin's; Hydra makes the launcher
    after this (config key `hydra.callbacks.launcher`).
    """

    def on_multirun_start(self, config, **kwargs) -> None:
        launcher = config.hydra.get("launcher")
        target = launcher.get("_target_") if launcher is not None else None
        if target in SUBMITIT:
            launcher._target_ = SUBMITIT[target]

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
        from transfer.aggregate import aggregate, for_people

        sweep = Path(config.hydra.sweep.dir)
        try:
            _, table, _ = aggregate([sweep])
            print(for_people(table).to_markdown(index=False))
            print(f"\ntables and plots in {sweep / 'tables'}")
        except TransferError as e:
            log.warning("no tables for %s: %s", sweep, e)
        except Exception as e:  # the jobs' records stand; `python -m transfer.aggregate` can try again
            log.warning("no tables for %s: %s: %s (python -m transfer.aggregate %s)", sweep, type(e).__name__, e, sweep)

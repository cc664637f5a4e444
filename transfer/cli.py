"""`python -m transfer`: check the command line, then let Hydra run the job(s).

Heavy imports (torch, transformers) happen inside the job, after the config of
every job has been checked, so a bad override fails within a second.
"""

import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from transfer import schema  # noqa: F401  (registers the config schema)
from transfer.errors import TransferError
from transfer.validate import CONF_DIR, AlreadyDone, check_command_line

log = logging.getLogger("transfer")
_failed_jobs: list[str] = []


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def _job(cfg: DictConfig) -> None:
    from pathlib import Path

    from transfer.run import run_experiment

    hc = HydraConfig.get()
    choices = {g: hc.runtime.choices.get(g) for g in schema.GROUPS}
    choices["reference"] = hc.runtime.choices.get("eval/reference")
    try:
        run_experiment(cfg, Path(hc.runtime.output_dir), choices, list(hc.overrides.task))
    except TransferError as e:
        log.error("error: %s", e)
        _failed_jobs.append(hc.runtime.output_dir)
    except Exception:
        log.exception("run failed; its record is in %s", hc.runtime.output_dir)
        _failed_jobs.append(hc.runtime.output_dir)
    finally:
        _release_device_memory()


def _release_device_memory() -> None:
    """A sweep runs its jobs in one process: the next job starts with the GPU memory this one held."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main() -> None:
    try:
        check_command_line(sys.argv[1:])
    except AlreadyDone as e:
        print(e)
        sys.exit(0)
    except TransferError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    _job()
    if _failed_jobs:
        if len(_failed_jobs) > 1 or "-m" in sys.argv or "--multirun" in sys.argv:
            print(f"error: {len(_failed_jobs)} job(s) failed: {', '.join(_failed_jobs)}", file=sys.stderr)
        sys.exit(1)

"""Output folders: may this run or sweep write where it would, and may it resume there.

A finished run is never overwritten; a killed one is resumed only under the config it was made with,
compared without the settings that do not change what is trained (FREE_ON_RESUME). Torch-free: Hydra
writes into the folder before a job starts, so this is decided at start-up.
"""

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from transfer.config.optimizer import learning_rate
from transfer.errors import TransferError
from transfer.fmt import count
from transfer.record import read_record

# a checkpoint folder's trainer state (optimizer, scheduler, RNG, progress): transfer.training.checkpoint writes it
STATE_FILE = "trainer_state.pt"
# settings a resumed run may change: they do not alter what is trained (loss chunks change
# only the order of float sums, and runs from before their default changed must resume)
FREE_ON_RESUME = (
    "resume", "tables_after_sweep", "checkpoint", "dry_run", "eval_batch_size", "log_interval",
    "hardware.loss_chunk_tokens", "hardware.attention", "hardware.compile", "hardware.compile_mode", "hardware.kernels",
    "distributed", "search", "eval.cka", "eval.cka_blocks", "cache", "hardware.memory_check", "hardware.estimate_memory",
    "hardware.return_freed_memory", "logging",
)  # fmt: skip


class AlreadyDone(Exception):
    """The run asked for is complete: nothing to do (resume=true on a finished run)."""


def check_run_dir(run_dir: Path, resume, cfg: DictConfig) -> None:
    """Hydra rewrites .hydra/ in the run folder before the job starts: decide here, not in the job.

    The caller holds the folder's lock (transfer.sweep.lock), so no other process is writing in it.
    """
    previous = read_previous(run_dir)
    if resume is True:
        if previous is None and not (run_dir / "checkpoints").is_dir():
            raise TransferError(f"resume=true but {run_dir} holds no run; name it: hydra.run.dir=<the run folder>")
        if previous is None:  # checkpoints without their record: each checkpoint's config is compared (checkpoint.py)
            return
        if previous.get("status") == "completed":
            raise AlreadyDone(f"{run_dir} holds a completed run: nothing to resume")
        if isinstance(previous.get("config"), dict):
            refuse_differences(previous["config"], cfg, f"resume: {run_dir} was run with", "this run has")
    elif previous is not None:
        raise TransferError(
            f"{run_dir} already holds a run (status {previous.get('status')}); "
            "continue it with resume=true, or choose another output folder (hydra.run.dir)"
        )


def check_sweep_dir(sweep_dir: Path, resume, configs: list[DictConfig]) -> None:
    """A sweep folder holding jobs is resumed under the configs its jobs ran with, or not at all.

    `configs` are the new sweep's jobs in Hydra's order (job N in sub-folder N); empty when the
    sub-folders are named otherwise, and each job then checks itself (run.run_experiment).
    """
    if not sweep_dir.is_dir():
        return
    if resume is not True:
        if any((job / "metrics.json").is_file() for job in sweep_dir.iterdir() if job.is_dir()):
            raise TransferError(
                f"{sweep_dir} already holds a sweep; continue it with resume=true, or choose another hydra.sweep.dir"
            )
        return
    for number, cfg in enumerate(configs):
        previous = read_previous(sweep_dir / str(number))
        if previous and isinstance(previous.get("config"), dict):
            refuse_differences(
                previous["config"], cfg, f"resume: job {number} of {sweep_dir} ran with", "this sweep gives it"
            )


def read_previous(folder: Path) -> dict | None:
    try:
        return read_record(folder)
    except ValueError as e:
        raise TransferError(
            f"{folder / 'metrics.json'} is unreadable ({e}); move it away to run or resume in this folder"
        ) from None


def refuse_differences(saved: dict, cfg: DictConfig, then: str, now: str) -> None:
    found = config_differences(saved, cfg)
    if found:
        key, old, new = found[0]
        raise TransferError(
            f"{then} {key}={old!r}, {now} {key}={new!r} ({count(len(found), 'difference')}); "
            "repeat the interrupted command's overrides and add resume=true"
        )


def resumable_config(cfg) -> dict:
    """The run's config as far as it decides the training, for comparison on resume."""
    return _rate_used(_without_free_settings(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)))


def config_differences(saved: dict, cfg) -> list[tuple[str, object, object]]:
    """(key, saved value, new value) for each setting that decides the training and differs."""
    # the saved config may hold settings made free on resume since it was written
    return differences(_rate_used(_without_free_settings(saved)), resumable_config(cfg))


def _rate_used(config: dict) -> dict:
    """optimizer.lr as the rate used, strategy.lr dropped: the same training compares equal however its rate was
    given, and a config saved before strategies had rates of their own compares with today's."""
    if isinstance(config.get("optimizer"), dict) and isinstance(config.get("strategy"), dict):
        config["optimizer"]["lr"] = learning_rate(config)[0]
        config["strategy"].pop("lr", None)
    return config


def _without_free_settings(config: dict) -> dict:
    for key in ("hydra", *FREE_ON_RESUME):
        *parents, name = key.split(".")
        node = config
        for parent in parents:
            node = node.get(parent) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(name, None)
    return config


def differences(a, b, prefix: str = "") -> list[tuple[str, object, object]]:
    """(key, a's value, b's value) for each leaf where two nested dicts differ, keys dotted from `prefix`."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in dict.fromkeys([*a, *b]):
            out += differences(a.get(key), b.get(key), f"{prefix}{key}.")
        return out
    return [] if a == b else [(prefix.rstrip("."), a, b)]


def check_resume(resume) -> None:
    """resume: true, false, or a run folder or checkpoint folder that holds a checkpoint."""
    if not isinstance(resume, (bool, str)) and resume is not None:
        raise TransferError(f"resume={resume!r}: allowed true, false, or the path of a run folder or checkpoint")
    if isinstance(resume, str):
        path = Path(resume).expanduser()
        if not path.exists():
            raise TransferError(
                f"resume={resume!r}: no such folder; allowed: true, or a run folder or checkpoint folder"
            )
        # a checkpoint folder holds the trainer state; a run folder holds them in checkpoints/step-*/
        if not (path / STATE_FILE).is_file() and not any(path.glob(f"checkpoints/step-*/{STATE_FILE}")):
            raise TransferError(
                f"resume={resume!r}: no checkpoint there; allowed: true, a run folder with checkpoints/, "
                "or a checkpoint folder"
            )

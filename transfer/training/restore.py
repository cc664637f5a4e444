"""Which checkpoint a run or an export starts from, and whether it may: the folder a resume continues, an
init_from parent's final weights (and its own parents'), a finished run's best or last weights for an export.

Each is found on disk, checked to be the run's own (inside its folder, made with its config) and intact
(checkpoint.damage), then loaded through checkpoint.load_weights. A damaged step checkpoint is passed over for
the one before it; anything else wrong is refused in one line. transfer.training.checkpoint writes the folders
and reads them back; this module decides which one.
"""

import json
import logging
from pathlib import Path

from safetensors.torch import load_file

from transfer.config.checks import init_from_chain
from transfer.config.folders import config_differences
from transfer.errors import TransferError, first_line
from transfer.fmt import count
from transfer.training import distributed
from transfer.training.checkpoint import CONFIG_FILE, STATE_FILE, check_fit, damage, load_weights, step_folders

log = logging.getLogger(__name__)


def check_same_config(folder: Path, cfg) -> None:
    """Refuse to continue a checkpoint under a different config: one line naming the first difference."""
    path = folder / CONFIG_FILE
    try:
        saved = json.loads(path.read_text())
        if not isinstance(saved, dict):
            raise ValueError(f"{CONFIG_FILE} holds no config")
    except (OSError, ValueError) as e:
        raise TransferError(
            f"resume: checkpoint {folder} is unreadable ({first_line(e)}); pick another with resume=PATH"
        ) from None
    differences = config_differences(saved, cfg)
    if differences:
        key, old, new = differences[0]
        raise TransferError(
            f"resume: checkpoint {folder} was made with {key}={old!r}, this run has {key}={new!r} "
            f"({count(len(differences), 'difference')}); repeat the interrupted run's overrides and add resume=true"
        )


def load_parent(model, run_dir: Path):
    """A completed run's final weights (best or last, as it was evaluated) put into `model`, the same base model.

    A peft parent's adapter is merged into the base, so that a new strategy adapts the parent's
    model (and a preference objective's reference is the parent, not the base). A parent that
    started from another run (its own init_from) saved only what it trained, so the chain is
    loaded oldest first: the grandparent's weights, then the parent's over them. Returns the
    model and what the record says of its parent (and, under `init_from`, of the parent's).
    """
    info = None
    for folder, record in reversed(init_from_chain(run_dir, f"init_from={str(run_dir)!r}")):
        model, info = _load_run(model, folder, record, info)
    return model, info


def _load_run(model, run_dir: Path, record: dict, parent: dict | None):
    """One run's final weights over `model` (which holds its parent's, if it had one)."""
    final = record["train"]["final_weights"]
    where = f"init_from={str(run_dir)!r}"
    info = {"run": str(run_dir.resolve()), "weights": final["which"], "step": final["step"],
            "strategy": record["config"]["strategy"]["name"], "objective": (record.get("objective") or {}).get("name")}  # fmt: skip
    if parent is not None:
        info["init_from"] = parent
    then = record.get("model") or {}
    for key, now in (("layers", model.config.num_hidden_layers), ("vocab_size", model.config.vocab_size)):
        if then.get(key) is not None and then[key] != now:  # the model on disk changed since that run
            raise TransferError(f"{where}: that run's model had {key} {then[key]}, this one has {now}; "
                                "allowed: a run of the same model")  # fmt: skip
    if final["step"] == 0:  # its untrained weights were its best: nothing to load
        return model, info
    folder = weights_folder(run_dir, record, final["which"], final["step"], f"{where}: its final")
    if (folder / "adapter_config.json").is_file():
        model = _merged_adapter(model, folder)
    else:
        load_weights(folder, model)
    return model, {**info, "folder": str(folder.resolve())}


def _merged_adapter(model, folder: Path):
    """A peft adapter folded into the model, once every one of its tensors found its place."""
    from peft import PeftModel, get_peft_model_state_dict

    saved = load_file(folder / "adapter_model.safetensors")
    try:
        adapted = PeftModel.from_pretrained(model, folder)
    except (RuntimeError, ValueError) as e:  # peft's size mismatch, or a target module the model lacks
        raise TransferError(f"checkpoint {folder} does not fit this model ({first_line(e)})") from None
    check_fit(saved, get_peft_model_state_dict(adapted), folder)
    return adapted.merge_and_unload()


def weights_folder(run_dir: Path, record: dict, which: str, step: int, whose: str) -> Path:
    """The folder that holds a run's `which` weights of `step` (best/ where it holds that step, else the step's
    checkpoint), on disk, the run's own (check_own) and intact (damage: by rank 0 alone under torchrun); one line
    naming what is wrong otherwise. `whose` starts the line ("runs/x: the", "init_from='runs/x': its final")."""
    checkpoints = run_dir / "checkpoints"
    folder = checkpoints / f"step-{step:06d}"
    best = checkpoints / "best" / "best.json"
    if which == "best" and best.is_file() and json.loads(best.read_text()).get("step") == step:
        folder = best.parent
    what = f"{whose} {which} weights (step {step})"
    if not folder.is_dir():
        raise TransferError(
            f"{what} are not on disk: {folder} is missing (checkpoint.enabled=false, or removed); allowed: a run "
            "that kept its checkpoints"
        )
    check_own(folder, run_dir, record.get("config"), what)
    problem = distributed.from_rank_zero(lambda: damage(folder))
    if problem:
        raise TransferError(f"{what} in {folder} are damaged ({problem})")
    return folder


def check_own(folder: Path, run_dir: Path, config: dict | None, where: str) -> None:
    """`folder` is a checkpoint of the run in `run_dir`: inside it, links and all, and (where the checkpoint says
    which config made it) made with the run's config. A folder or file linked in from another run, or a checkpoint
    copied from one, is refused in one line: its weights are not this run's."""
    inside = run_dir.resolve()
    for path in (folder, *sorted(folder.rglob("*"))):
        if not path.resolve().is_relative_to(inside):
            raise TransferError(
                f"{where}: {path} leads out of the run ({path.resolve()}); allowed: the run's own checkpoints"
            )
    saved = folder / CONFIG_FILE
    if config is None or not saved.is_file():
        return
    try:
        from omegaconf import OmegaConf

        differences = config_differences(json.loads(saved.read_text()), OmegaConf.create(config))
    except Exception as e:  # unreadable, or not a config: either way not this run's
        differences = [(CONFIG_FILE, "unreadable", first_line(e))]
    if differences:
        key, theirs, ours = differences[0]
        raise TransferError(
            f"{where}: {folder} was made with {key}={theirs!r}, the run has {key}={ours!r}: it is another run's "
            "checkpoint; allowed: the run's own checkpoints"
        )


def find_resume_point(resume, run_dir: Path) -> Path | None:
    """The intact checkpoint folder `resume` points at: true = the run's own newest intact one (None if it has none).

    A damaged checkpoint is passed over for the one before it, with a warning naming the bad
    file; when every one is damaged, or the one named by a path is, the run is refused.
    """
    if resume is False or resume is None:
        return None
    if resume is True:
        folders = step_folders(run_dir / "checkpoints")
        if not folders:
            log.warning("resume: %s has no checkpoint; starting from step 0", run_dir)
            return None
        return _newest_intact(folders, str(run_dir / "checkpoints"))
    path = Path(str(resume)).expanduser()
    if (path / STATE_FILE).is_file():
        return _newest_intact([path], str(path))
    folders = step_folders(path / "checkpoints")
    if folders:
        return _newest_intact(folders, str(path / "checkpoints"))
    raise TransferError(
        f"resume={resume!r}: no checkpoint there; allowed: true, a run folder with checkpoints/, or a checkpoint folder"
    )


def _newest_intact(folders: list[Path], where: str) -> Path:
    problems = []
    for folder in reversed(folders):
        problem = damage(folder)
        if problem is None:
            if problems:
                log.warning("resume: falling back to %s", folder.name)
            return folder
        problems.append(f"{folder.name}/{problem}")
        log.warning("resume: checkpoint %s is damaged: %s", folder, problem)
    raise TransferError(
        f"resume: no intact checkpoint in {where} ({'; '.join(problems)}); "
        "start the run again without resume, in another folder"
    )

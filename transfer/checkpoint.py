"""Checkpoints on disk: weights in safetensors plus the trainer state to resume from.

Layout in a run folder:
    checkpoints/step-000050/   weights + trainer_state.pt (optimizer, scheduler, scaler, RNG, progress)
    checkpoints/best/          the weights with the lowest validation loss so far + best.json

Weights: peft strategies save only the adapter, in peft's own format (loadable with
`PeftModel.from_pretrained`); the others save their trainable tensors
(`trainable.safetensors`), or the whole model with checkpoint.full_model=true.
Each checkpoint is written to a temporary folder and renamed into place, so a
killed run never leaves half a checkpoint behind.
"""

import json
import os
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from transfer.errors import TransferError, first_line

WEIGHT_FILES = ("adapter_model.safetensors", "trainable.safetensors", "model.safetensors")
STATE_FILE = "trainer_state.pt"
CONFIG_FILE = "run_config.json"
# settings a resumed run may change: they do not alter what is trained (loss chunks change
# only the order of float sums, and runs from before their default changed must resume)
FREE_ON_RESUME = (
    "resume", "tables_after_sweep", "checkpoint", "dry_run", "eval_batch_size", "log_interval",
    "hardware.loss_chunk_tokens",
)  # fmt: skip


def resumable_config(cfg) -> dict:
    """The run's config as far as it decides the training, for comparison on resume."""
    from omegaconf import OmegaConf

    return _without_free_settings(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))


def _without_free_settings(config: dict) -> dict:
    for key in ("hydra", *FREE_ON_RESUME):
        *parents, name = key.split(".")
        node = config
        for parent in parents:
            node = node.get(parent) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(name, None)
    return config


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
    # the saved config may hold settings made free on resume since it was written
    differences = _differences(_without_free_settings(saved), resumable_config(cfg))
    if differences:
        key, old, new = differences[0]
        raise TransferError(
            f"resume: checkpoint {folder} was made with {key}={old!r}, this run has {key}={new!r} "
            f"({len(differences)} difference(s)); repeat the interrupted run's overrides and add resume=true"
        )


def _differences(a, b, prefix: str = "") -> list[tuple[str, object, object]]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in dict.fromkeys([*a, *b]):
            out += _differences(a.get(key), b.get(key), f"{prefix}{key}.")
        return out
    return [] if a == b else [(prefix.rstrip("."), a, b)]


def is_peft(model) -> bool:
    return hasattr(model, "peft_config")


def trainable_state(model) -> dict[str, torch.Tensor]:
    """A CPU copy of the trainable tensors: all that training changes."""
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}


def restore_trainable(model, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


def save(folder: Path, model, full_model: bool, trainer_state: dict | None = None, meta: dict | None = None,
         config: dict | None = None) -> int:  # fmt: skip
    """Write a checkpoint atomically; return the size in bytes of its weight files."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if is_peft(model) or full_model:
        model.save_pretrained(tmp)
    else:
        save_file({n: t.contiguous() for n, t in trainable_state(model).items()}, tmp / "trainable.safetensors")
    if trainer_state is not None:
        torch.save(trainer_state, tmp / STATE_FILE)
    if meta is not None:
        (tmp / "best.json").write_text(json.dumps(meta))
    if config is not None:
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=1))
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return weights_bytes(folder)


def weights_bytes(folder: Path) -> int:
    return sum((folder / f).stat().st_size for f in WEIGHT_FILES if (folder / f).is_file())


def load_weights(folder: Path, model) -> None:
    """Put a checkpoint's weights into a model prepared the same way (same strategy)."""
    if is_peft(model):
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(folder / "adapter_model.safetensors"))
        return
    file = folder / "trainable.safetensors"
    if not file.is_file():
        file = folder / "model.safetensors"
    result = model.load_state_dict(load_file(file), strict=False)
    if result.unexpected_keys:
        raise TransferError(f"checkpoint {folder} does not fit this model: unexpected {result.unexpected_keys[:3]}")


def step_folders(run_checkpoints: Path) -> list[Path]:
    """Complete step checkpoints, oldest first."""
    if not run_checkpoints.is_dir():
        return []
    return sorted(
        p for p in run_checkpoints.glob("step-*") if (p / STATE_FILE).is_file() and not p.name.endswith(".tmp")
    )


def prune(run_checkpoints: Path, keep: int) -> None:
    for old in step_folders(run_checkpoints)[:-keep] if keep > 0 else step_folders(run_checkpoints):
        shutil.rmtree(old)


def find_resume_point(resume, run_dir: Path) -> Path | None:
    """The checkpoint folder `resume` points at: true = the run's own last one (None if it has none)."""
    if resume is False or resume is None:
        return None
    if resume is True:
        folders = step_folders(run_dir / "checkpoints")
        return folders[-1] if folders else None
    path = Path(str(resume)).expanduser()
    if (path / STATE_FILE).is_file():
        return path
    folders = step_folders(path / "checkpoints")
    if folders:
        return folders[-1]
    raise TransferError(
        f"resume={resume!r}: no checkpoint there; allowed: true, a run folder with checkpoints/, or a checkpoint folder"
    )


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_trainer_state(folder: Path) -> dict:
    try:
        return torch.load(folder / STATE_FILE, map_location="cpu", weights_only=False)
    except Exception as e:
        raise TransferError(
            f"resume: checkpoint {folder} is unreadable ({first_line(e)}); pick another with resume=PATH"
        ) from None

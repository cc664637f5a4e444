"""Checkpoints on disk: weights in safetensors plus the trainer state to resume from.

Layout in a run folder:
    checkpoints/step-000050/   weights + trainer_state.pt (optimizer, scheduler, scaler, RNG, progress)
    checkpoints/best/          the weights with the lowest validation loss so far + best.json

Weights: peft strategies save only the adapter, in peft's own format (loadable with
`PeftModel.from_pretrained`); the others save their trainable tensors
(`trainable.safetensors`), or the whole model with checkpoint.full_model=true.
A model FSDP2 shards over several processes is saved in shards instead (`sharded/`,
transfer/shards.py), which resume on any number of processes; with full_model=true rank 0
also writes the Hugging Face folder, gathered onto it alone.

Each checkpoint is written to a temporary folder and renamed into place, so a
killed run never leaves half a checkpoint behind, and a failed write (a full disk)
leaves no temporary folder either. `manifest.json` holds the size and SHA-256 of
every other file: a resume verifies them, and the safetensors weights' values, before it
trusts a checkpoint, and falls back to the newest intact one. Which checkpoint a resume, an
init_from or an export takes, and whether it is the run's own, is transfer.training.restore's.

The trainer state is read with `torch.load(weights_only=True)`: tensors and plain values
only, so a checkpoint from elsewhere cannot run code when it is loaded; the shards' metadata
is read through a list of the classes it may name (shards.read_metadata).
"""

import hashlib
import json
import logging
import os
import pickle
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from transfer.config.folders import STATE_FILE
from transfer.config.model import safetensors_problem
from transfer.errors import TransferError, UnsafeCheckpoint, first_line, reason
from transfer.training import distributed

log = logging.getLogger(__name__)
WEIGHT_FILES = ("adapter_model.safetensors", "trainable.safetensors", "model.safetensors")
CONFIG_FILE = "run_config.json"
MANIFEST = "manifest.json"
SHARDS = "sharded"  # an FSDP2 model's checkpoint in shards (transfer/shards.py)


def is_peft(model) -> bool:
    return hasattr(model, "peft_config")


def trainable_state(model) -> dict[str, torch.Tensor]:
    """A CPU copy of the trainable tensors, all that training changes: this process's shards under FSDP2."""
    with torch.no_grad():
        return {n: distributed.local(p).to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}


def restore_trainable(model, state: dict[str, torch.Tensor]) -> None:
    """Put back what trainable_state copied."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            distributed.local(params[name]).copy_(value)


def load_optimizer_state(optimizer, state: dict) -> None:
    """A whole optimizer state (saved by one process, or under DDP) into this one: each rank keeps its shard of
    the moments of a parameter FSDP2 shards."""
    optimizer.load_state_dict(state)
    for param, values in optimizer.state.items():
        for key, value in values.items():
            if torch.is_tensor(value) and hasattr(param, "device_mesh") and value.shape == param.shape:
                values[key] = distributed.like(value, param)


def save(folder: Path, model, full_model: bool, optimizer=None, trainer_state: dict | None = None,
         meta: dict | None = None, config: dict | None = None) -> int | None:  # fmt: skip
    """Write a checkpoint atomically; return the size in bytes of its weights. `optimizer`: a step checkpoint's.

    In several processes every rank calls it. Rank 0 writes the files, except the shards of an FSDP2
    model, which each rank writes (a shared folder: the run's); the others return None.
    """
    sharded = distributed.is_sharded(model)
    whole = shards = None
    if sharded and full_model:  # the Hugging Face folder too: gathered onto rank 0 alone
        whole = _gathered_on_rank_zero(model)
    if sharded:  # before any rank can fail alone: every rank must reach dcp.save
        from transfer.training import shards as sharding

        shards, groups = sharding.shard_state(model, optimizer)
        if trainer_state is not None and groups is not None:
            trainer_state = {**trainer_state, "optimizer_param_groups": groups}
    tmp = folder.with_name(folder.name + ".tmp")
    problem = None
    if distributed.is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir(parents=True)
        except OSError as e:
            problem = reason(e)
    problem = distributed.broadcast(problem)
    try:
        if problem is None and sharded:
            problem = sharding.save(tmp / SHARDS, shards)
        if problem is None and distributed.is_main():
            if trainer_state is not None and optimizer is not None and not sharded:
                trainer_state = {**trainer_state, "optimizer": optimizer.state_dict()}
            problem = _write_files(tmp, folder, model, sharded, full_model, whole, trainer_state, meta, config)
    except BaseException:
        if distributed.is_main():
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    problem = distributed.broadcast(problem)  # every rank goes on, or fails, with rank 0
    if problem is not None:
        if distributed.is_main():
            shutil.rmtree(tmp, ignore_errors=True)
        raise TransferError(
            f"cannot write the checkpoint {folder} ({problem}); free space there, or set checkpoint.enabled=false"
        )
    return weights_bytes(folder) if distributed.is_main() else None


def _gathered_on_rank_zero(model) -> dict | None:
    """The whole model's state on rank 0's CPU (None elsewhere); tied weights left out by name, as HF would."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from transfer.training.shards import untied

    whole = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return untied(model, whole) if distributed.is_main() else None


def _write_files(tmp: Path, folder: Path, model, sharded: bool, full_model: bool, whole, trainer_state, meta,
                 config) -> str | None:  # fmt: skip
    """Rank 0's part: weights (unless sharded alone), state, meta, config, manifest; then the rename into place."""
    try:
        if not sharded and not is_peft(model) and not full_model:
            trainable = {n: p.detach().to("cpu").contiguous() for n, p in model.named_parameters() if p.requires_grad}
            save_file(trainable, tmp / "trainable.safetensors")
        elif not sharded or full_model:
            model.save_pretrained(tmp, state_dict=whole)
        if trainer_state is not None:
            torch.save(trainer_state, tmp / STATE_FILE)
        if meta is not None:
            (tmp / "best.json").write_text(json.dumps(meta))
        if config is not None:
            (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=1))
        files = {
            p.relative_to(tmp).as_posix(): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
            for p in sorted(tmp.rglob("*"))
            if p.is_file()
        }
        (tmp / MANIFEST).write_text(json.dumps({"files": files}, indent=1))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except Exception as e:  # a full disk surfaces as OSError, safetensors' own error or torch's RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)
        return reason(e)
    return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(2**22), b""):
            digest.update(block)
    return digest.hexdigest()


def _has_shards(folder: Path) -> bool:
    """Whether a checkpoint holds a sharded model (transfer/shards.py), whose metadata names its tensors."""
    return (folder / SHARDS / ".metadata").is_file()


def weights_bytes(folder: Path) -> int:
    """The bytes of a checkpoint's weights: its weight files, or the model's tensors among the shards."""
    if _has_shards(folder) and not any((folder / f).is_file() for f in WEIGHT_FILES):
        from transfer.training.shards import model_bytes

        return model_bytes(folder / SHARDS)
    return sum((folder / f).stat().st_size for f in WEIGHT_FILES if (folder / f).is_file())


def damage(folder: Path) -> str | None:
    """What is wrong with a checkpoint folder, or None when it is intact.

    Every file the manifest lists must be there with its size and checksum; the weights must
    be well framed and finite; the trainer state must load as tensors and plain values. One
    that holds anything else raises UnsafeCheckpoint: such a file was not made by a run of
    ours, and nothing in its folder is trusted.
    """
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        listed = manifest["files"]
    except FileNotFoundError:
        listed = None  # made before checkpoints had manifests: the checks below still apply
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{MANIFEST}: unreadable ({first_line(e)})"
    unlisted = [name for name in WEIGHT_FILES if listed is not None and name not in listed and (folder / name).exists()]
    if unlisted:
        return f"{unlisted[0]}: not written with the checkpoint (its manifest does not list it)"
    for name, entry in (listed or {}).items():
        path = folder / name
        if not path.is_file():
            return f"{name}: missing"
        if path.stat().st_size != entry.get("bytes"):
            return f"{name}: {path.stat().st_size:,} bytes where {entry.get('bytes'):,} were written (truncated?)"
        if _sha256(path) != entry.get("sha256"):
            return f"{name}: its checksum differs from the one written with it (changed or damaged)"
    if _has_shards(folder):
        from transfer.training.shards import read_metadata

        try:
            read_metadata(folder / SHARDS)
        except UnsafeCheckpoint:
            raise
        except TransferError as e:
            return f"{SHARDS}/.metadata: {e}"
    for name in WEIGHT_FILES:
        path = folder / name
        if not path.is_file():
            continue
        problem = safetensors_problem(path)
        if problem:
            return f"{name}: {problem}"
        bad = [key for key, t in load_file(path).items() if t.is_floating_point() and not torch.isfinite(t).all()]
        if bad:
            return f"{name}: {bad[0]} holds NaN or infinite values"
    if (folder / STATE_FILE).is_file():
        try:
            load_trainer_state(folder)
        except UnsafeCheckpoint:
            raise
        except TransferError:
            return f"{STATE_FILE}: not a trainer state"
    return None


def load_weights(folder: Path, model) -> None:
    """Put a checkpoint's weights into a model prepared the same way (same strategy)."""
    if _has_shards(folder):
        from transfer.training.shards import load

        load(folder / SHARDS, model)
        return
    adapter = (folder / "adapter_model.safetensors").is_file()
    if adapter != is_peft(model):
        holds, wants = ("a peft adapter", "trains the model's own weights") if adapter else \
            ("the model's own weights", "trains a peft adapter")  # fmt: skip
        raise TransferError(
            f"checkpoint {folder} holds {holds}, but the run's strategy {wants}; allowed: a checkpoint of the same "
            "strategy"
        )
    if adapter:
        from peft import get_peft_model_state_dict, set_peft_model_state_dict

        tensors = load_file(folder / "adapter_model.safetensors")
        check_fit(tensors, get_peft_model_state_dict(model), folder)
        set_peft_model_state_dict(model, tensors)
        return
    file = folder / "trainable.safetensors"
    if not file.is_file():
        file = folder / "model.safetensors"
    tensors = load_file(file)
    check_fit(tensors, model.state_dict(), folder)
    params = dict(model.named_parameters())
    model.load_state_dict({k: distributed.like(v, params[k]) if k in params else v for k, v in tensors.items()},
                          strict=False)  # fmt: skip


def check_fit(tensors: dict, state: dict, folder: Path) -> None:
    """Every tensor of a checkpoint has a place of its name and shape in the model: else refused in one line naming
    the first that do not (a checkpoint of another shape of model would fill only part of it, silently)."""
    misfits = [
        f"{name} {tuple(t.shape)}" + (f" where the model's is {tuple(state[name].shape)}" if name in state else
                                      " (no such tensor here)")
        for name, t in tensors.items()
        if name not in state or tuple(state[name].shape) != tuple(t.shape)
    ]  # fmt: skip
    if misfits:
        raise TransferError(
            f"checkpoint {folder} does not fit this model: {len(misfits)} of its {len(tensors)} tensors have no "
            f"place of their name and shape ({'; '.join(misfits[:3])}); allowed: weights of the same model"
        )


def load_training_state(folder: Path, model, optimizer, trainer_state: dict) -> None:
    """A step checkpoint's weights and optimizer state, whichever way they were saved: whole (the optimizer's in
    the trainer state), or in shards (its moments there, its param groups in the trainer state)."""
    if "optimizer" in trainer_state:
        load_weights(folder, model)
        load_optimizer_state(optimizer, trainer_state["optimizer"])
    else:
        from transfer.training.shards import load

        load(folder / SHARDS, model, optimizer, trainer_state["optimizer_param_groups"])


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
    """The trainer state, as tensors and plain values only: nothing in it runs when it is read."""
    path = folder / STATE_FILE
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "GLOBAL" in str(e):  # a class or function to import and call: what weights_only refuses
            raise UnsafeCheckpoint(
                f"resume: {path} holds objects other than tensors and plain values, which a checkpoint of ours "
                "never does; refused, since loading it could run code (resume only from checkpoints you made)"
            ) from None
        raise TransferError(
            f"resume: {path} is unreadable (not a trainer state); pick another with resume=PATH"
        ) from None
    except Exception as e:
        raise TransferError(f"resume: {path} is unreadable ({first_line(e)}); pick another with resume=PATH") from None

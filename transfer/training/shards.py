"""Checkpoints of a model FSDP2 shards over several processes, through torch.distributed.checkpoint.

Each process writes its own shards of the weights (and, for a step checkpoint, of the
optimizer's moments) into `<checkpoint>/sharded/`: `.metadata` and a `__<rank>_0.distcp` file
a process. No process ever holds the whole state. Reading lays the shards out for the model
that reads them, sharded over any number of processes or whole in one, so a run resumes on
another number of processes than it stopped on.

Shards hold tensors only, read with `torch.load(weights_only=True)`; the optimizer's param
groups go with the trainer state. torch reads `.metadata` with plain pickle, though, and falls
back to a rank's own `__<rank>.metadata` when that fails; so `.metadata` is read here, through
a list of the classes it may name, checked to describe only tensors in this folder's shard
files, and handed to torch by a reader that has no fallback.
"""

import pickle
import re
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import state_dict as dsd
from torch.distributed.checkpoint.filesystem import FileSystemReader, _StorageInfo
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata

from transfer.errors import TransferError, UnsafeCheckpoint, first_line, reason
from transfer.training import distributed

SHARD_FILE = re.compile(r"__\d+_\d+\.distcp")


def shard_state(model, optimizer=None) -> tuple[dict, list | None]:
    """What a sharded checkpoint holds, by name (FQN), as this process lays it out (DTensors under FSDP2): the
    model's tensors and the optimizer's moments; and the optimizer's param groups, for the trainer state."""
    if optimizer is None:
        return {"model": untied(model, dsd.get_model_state_dict(model))}, None
    weights, moments = dsd.get_state_dict(model, optimizer)
    return {"model": untied(model, weights), "optimizer": {"state": moments["state"]}}, moments["param_groups"]


def untied(model, state: dict) -> dict:
    """`state` without the second names of tied weights (the head that is the embedding): each tensor saved once."""
    tied = tied_names(model)
    return {n: t for n, t in state.items() if n not in tied}


def tied_names(model) -> set[str]:
    return {n for n, _ in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()}


def save(path: Path, shards: dict) -> str | None:
    """Each rank writes its shards (torch.distributed.checkpoint raises a failure on every rank); what went wrong."""
    try:
        dcp.save(shards, checkpoint_id=str(path))  # a str: the metadata then holds no path object
    except (Exception, dcp.api.CheckpointException) as e:  # the latter is a BaseException
        return reason(e)
    return None


def load(path: Path, model, optimizer=None, param_groups=None) -> None:
    """The shards into this model (and optimizer) as it is laid out: sharded over any number of processes, or
    whole in one (no process group needed then)."""
    metadata = read_metadata(path)  # refused here, in one line, rather than inside torch's loading
    state, _ = shard_state(model, optimizer)
    try:
        with warnings.catch_warnings():  # one process reading shards is what we mean: torch warns that it assumes so
            warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
            dcp.load(state, storage_reader=_Reader(path, metadata), no_dist=not distributed.active())  # fills `state`
    except (Exception, dcp.api.CheckpointException) as e:
        raise TransferError(f"checkpoint {path.parent} does not fit this model ({reason(e)})") from None
    options = dsd.StateDictOptions(strict=False)  # a tied head is its embedding, which `state` holds
    if optimizer is None:
        missing = dsd.set_model_state_dict(model, state["model"], options=options).missing_keys
    else:
        moments = {**state["optimizer"], "param_groups": param_groups}
        missing = dsd.set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=moments,
                                     options=options).missing_keys  # fmt: skip
    lacking = set(missing) - tied_names(model)
    if lacking:
        raise TransferError(f"checkpoint {path.parent} does not fit this model: it lacks {sorted(lacking)[:3]}")


def model_bytes(path: Path) -> int:
    """The bytes of the model's tensors among the shards."""
    return sum(
        entry.size.numel() * entry.properties.dtype.itemsize
        for key, entry in read_metadata(path).state_dict_metadata.items()
        if key.startswith("model.")
    )


# ---------------------------------------------------------------- reading .metadata safely
# what a .metadata file may name: torch.distributed.checkpoint's own records, shapes, dtypes, paths
_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "MetadataIndex", "StorageMeta", "TensorProperties",
                                              "TensorStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    "pathlib._local": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},  # Python 3.13's pickles
}  # fmt: skip


class _MetadataUnpickler(pickle._Unpickler):
    """Python's own unpickler, limited to the classes above, and never setting state on a class or function
    (a BUILD on one would change it for the whole process)."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def find_class(self, module, name):
        allowed = name in _METADATA_CLASSES.get(module, ()) or (
            module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        )
        if not allowed:
            raise UnsafeCheckpoint(f"{module}.{name}")
        return super().find_class(module, name)

    def _build(self):
        if callable(self.stack[-2]):
            raise UnsafeCheckpoint(f"state for {getattr(self.stack[-2], '__name__', 'a callable')}")
        pickle._Unpickler.load_build(self)

    dispatch[pickle.BUILD[0]] = _build


def read_metadata(path: Path):
    """A sharded checkpoint's metadata, read without running code and checked to describe tensors in this folder's
    shard files only; else UnsafeCheckpoint (not made by a run of ours), or TransferError (unreadable)."""
    file = path / ".metadata"
    unsafe = (f"resume: {file} {{}}: the metadata of a checkpoint of ours never does; refused, since loading it "
              "could run code or read other files (resume only from checkpoints you made)")  # fmt: skip
    try:
        with open(file, "rb") as fh:
            metadata = _MetadataUnpickler(fh).load()
    except UnsafeCheckpoint as e:
        raise UnsafeCheckpoint(unsafe.format(f"names {e}")) from None
    except Exception as e:
        raise TransferError(f"{file} is unreadable ({first_line(e)})") from None
    if not isinstance(metadata, Metadata) or not isinstance(metadata.state_dict_metadata, dict):
        raise TransferError(f"{file} is no checkpoint metadata")
    other = [k for k, entry in metadata.state_dict_metadata.items() if not isinstance(entry, TensorStorageMetadata)]
    if other:
        raise UnsafeCheckpoint(unsafe.format(f"holds {other[0]!r}, no tensor"))
    for info in (metadata.storage_data or {}).values():
        if not isinstance(info, _StorageInfo) or not SHARD_FILE.fullmatch(str(info.relative_path)):
            where = getattr(info, "relative_path", info)
            raise UnsafeCheckpoint(unsafe.format(f"points to {where!r}, no shard file of its folder"))
        if info.transform_descriptors:
            raise UnsafeCheckpoint(unsafe.format(f"asks for transforms {info.transform_descriptors!r}"))
    return metadata


class _Reader(FileSystemReader):
    """torch's file reader, handed the metadata read above. Its read_metadata takes no rank: torch then never
    falls back to a rank's own metadata file, which it would read with plain pickle."""

    def __init__(self, path: Path, metadata):
        super().__init__(str(path))
        self.metadata = metadata

    def read_metadata(self):
        if getattr(self.metadata, "storage_meta", None) is None:
            self.metadata.storage_meta = StorageMeta()
        self.metadata.storage_meta.load_id = self.load_id
        return self.metadata

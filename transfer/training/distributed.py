"""One job on several processes (`torchrun --nproc-per-node N -m transfer ...`): who this process is,
the wrapper that keeps the gradients of every process in step, and the rule of one writer.

Every process draws the whole optimizer step's micro-batches from the same seeded stream
(cheap: indices into tokenised tensors) and computes the ones whose number is its rank modulo
N. Each divides its sums by the whole step's normaliser, known to all without a word exchanged,
and DDP's all-reduce adds the pieces: the step is the single process's step, whatever N is, as
long as N divides `grad_accum_steps` (checked before anything heavy). Only rank 0 writes the
record, the logs and TensorBoard. Checkpoints of a sharded model (FSDP2) are written by every
process, each its own shards, through torch.distributed.checkpoint (transfer/checkpoint.py);
those of a whole one by rank 0. All processes read a checkpoint to resume, and
torch.distributed.checkpoint lays the shards out again for another N, so a resume may use one.

Evaluation is split too: each process scores the batches whose number is its rank modulo N,
and the sums are added over the processes (`my_batches`, `summed_floats`).

The loss runs inside the wrapper's forward (`Trainee`): the fused head loss reaches into the
model's decoder and head, which called directly would bypass DDP's hooks and leave the head's
gradients unreduced on each rank.


torch is imported where it is used: the command-line checks ask `world_size()` within a second.
"""

import contextlib
import os


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def gpu_index() -> int:
    """This process's GPU: its local rank, among the GPUs it sees (a scheduler may show each process its own)."""
    import torch

    return local_rank() % max(1, torch.cuda.device_count())


def bars_off() -> bool | None:
    """tqdm's `disable`: None (shown on a terminal) on rank 0, True on the others, whose bars would repeat it."""
    return None if is_main() else True


def share(count: int) -> int:
    """How many of `count` evaluation batches each process runs (distributed.my_batches)."""
    return -(-count // world_size())


def is_main() -> bool:
    """Rank 0: the one process that writes."""
    return rank() == 0


def active() -> bool:
    return world_size() > 1


def init() -> None:
    """Join the process group torchrun set up (gloo on CPUs, NCCL for CUDA tensors); once a process."""
    if not active():
        return
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(gpu_index())
        dist.init_process_group("cpu:gloo,cuda:nccl")
    else:
        dist.init_process_group("gloo")


def broadcast(value):
    """Rank 0's `value` on every rank (a picklable object)."""
    if not active():
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def from_rank_zero(fn):
    """`fn()` as rank 0 computes it, on every rank; its error raised on every rank, as a TransferError (the others
    must not wait for rank 0 in a collective it never reaches). For work each rank would do alike, such as
    checksumming a checkpoint's every shard before a resume."""
    if not active():
        return fn()
    from transfer.errors import TransferError, first_line

    result = error = None
    if is_main():
        try:
            result = fn()
        except TransferError as e:
            error = str(e)
        except Exception as e:
            error = f"{type(e).__name__}: {first_line(e)}"
    result, error = broadcast((result, error))
    if error is not None:
        raise TransferError(error)
    return result


def any_rank(flag: bool, device) -> bool:
    """True on every rank when it is true on one: a stop must happen at the same step everywhere."""
    if not active():
        return flag
    import torch
    import torch.distributed as dist

    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def summed(value, device):
    """A tensor summed over the ranks, on `device` (a step's loss from its shares; an evaluation's table, each rank
    filling its own entries and zeros elsewhere)."""
    if not active():
        return value
    import torch.distributed as dist

    value = value.to(device)
    dist.all_reduce(value)
    return value


def summed_floats(*values: float) -> list[float]:
    """Python numbers summed over the ranks, in float64 (an evaluation's totals from each rank's share)."""
    if not active():
        return list(values)
    import torch

    return summed(torch.tensor(values, dtype=torch.float64), "cpu").tolist()  # gloo carries CPU tensors, beside NCCL


def my_batches(batches, count: int):
    """(number, batch) for this rank's share of an evaluation's `count` batches: those whose number is the
    rank modulo N. Every rank makes as many forward passes, since FSDP2 gathers each block's weights in a
    collective call: one with a batch fewer scores the first batch again, numbered None (not to be counted)."""
    if not active():
        yield from enumerate(batches)
        return
    first, mine = None, 0
    for number, batch in enumerate(batches):
        first = batch if first is None else first
        if number % world_size() == rank():
            mine += 1
            yield number, batch
    for _ in range(share(count) - mine):
        yield None, first


def barrier() -> None:
    if active():
        import torch.distributed as dist

        dist.barrier()


def shutdown() -> None:
    if active():
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def my_share(items: list) -> list:
    """This rank's items of a step's list: those whose number is the rank modulo N."""
    return items[rank() :: world_size()]


def kind(choice: str, model) -> str | None:
    """What wraps the model: None in one process; auto is FSDP2 when every parameter trains, else DDP."""
    if not active():
        return None
    if choice == "auto":
        return "fsdp" if all(p.requires_grad for p in model.parameters()) else "ddp"
    return choice


class Trainee:
    """The model as the loop uses it: `trainee(fn, *args)` is `fn(model, *args)`, run inside the wrapper's forward.

    DDP (every process holds the whole model) sees the loss's use of every trainable parameter;
    FSDP2 (`fully_shard` per decoder block and at the root) gathers the root's weights (embeddings,
    final norm, head) for the forward and each block's for its own. `use(fn, ...)` is for anything
    else done with the model (evaluation, generation): FSDP2 needs its root forward there too,
    DDP must not see a forward without a backward.
    """

    def __init__(self, model, device, choice: str = "auto"):
        self.model, self.wrapper = model, None
        self.kind = kind(choice, model)
        if self.kind == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            ids = [device.index] if device.type == "cuda" else None
            self.wrapper = DistributedDataParallel(_calls(model), device_ids=ids)
        elif self.kind == "fsdp":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            from transfer.models.anatomy import model_parts

            mesh = init_device_mesh(device.type, (world_size(),))
            for block in model_parts(model).blocks:
                fully_shard(block, mesh=mesh)
            self.wrapper = fully_shard(_calls(model), mesh=mesh)

    def __call__(self, fn, *args, **kwargs):
        if self.wrapper is None:
            return fn(self.model, *args, **kwargs)
        return self.wrapper(fn, *args, **kwargs)

    def use(self, fn, *args, **kwargs):
        if self.kind != "fsdp":
            return fn(self.model, *args, **kwargs)
        try:
            return self.wrapper(fn, *args, **kwargs)
        finally:
            # the root keeps its weights gathered after a forward, for the backward; without one they would stay
            # the module's parameters, and an optimizer made now would hold them instead of the shards
            self.wrapper.reshard()

    @contextlib.contextmanager
    def sync(self, last: bool):
        """Gradients are reduced once a step, in its last micro-batch."""
        if self.kind == "ddp" and not last:
            with self.wrapper.no_sync():
                yield
        elif self.kind == "fsdp":
            self.wrapper.set_requires_gradient_sync(last)
            yield
        else:
            yield

    @property
    def gradient_scale(self) -> int:
        """DDP and FSDP2 average the ranks' gradients; the step's update is their sum."""
        return world_size() if self.wrapper is not None else 1


def is_sharded(model) -> bool:
    """Whether FSDP2 shards the model's parameters over the processes."""
    return any(hasattr(p, "device_mesh") for p in model.parameters())


def local(p):
    """This process's shard of an FSDP2 parameter (its storage itself, without grad mode); any other tensor as it is."""
    return p.to_local() if hasattr(p, "to_local") else p


def full_tensor(t):
    """A sharded tensor (FSDP2's DTensor) gathered whole on every rank; any other as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def like(value, param):
    """`value`, a whole tensor every rank holds, as `param` is laid out (this rank's shard of it under FSDP2)."""
    if not hasattr(param, "device_mesh"):
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.to(param.device), param.device_mesh, param.placements, src_data_rank=None)


def clip_grad_norm(params, max_norm: float):
    """torch's clipping, with the norm of sharded gradients summed over the ranks first."""
    import torch

    grads = [p.grad for p in params if p.grad is not None]
    norm = full_tensor(torch.nn.utils.get_total_norm(grads))
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


def _calls(model):
    """A module whose forward is any function of the model: the one DDP wraps."""
    import torch

    class Calls(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, fn, *args, **kwargs):
            return fn(self.model, *args, **kwargs)

    return Calls(model)

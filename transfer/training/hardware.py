"""Where and in which precision a run computes."""

import contextlib
import ctypes
import os
import re
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from transfer.errors import TransferError
from transfer.fmt import count
from transfer.training import distributed

AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class OutOfMemory(TransferError):
    """The device ran out of memory: one line naming the settings and what would fit (see transfer.training.oom)."""


class MachineLoad:
    """What else the machine did while a run trained, so that a speed says how it was taken: the process's CPU
    time beside the wall time, and the 1-minute load average at each logged step. More runnable tasks than
    CPUs (the run's own threads included) means the run shared them: its speed is then marked contended."""

    def __init__(self):
        self.cpu, self.wall, self.loads = time.process_time(), time.perf_counter(), []
        self.sample()

    def sample(self) -> None:
        load = load_average()
        if load is not None:
            self.loads.append(load)

    def summary(self) -> dict:
        self.sample()
        cpus = available_cpus()
        load = max(self.loads) if self.loads else None
        return {
            "cpu_seconds": time.process_time() - self.cpu,
            "wall_seconds": time.perf_counter() - self.wall,  # of the loop, validation and checkpoints included
            "cpus": cpus,
            "torch_threads": torch.get_num_threads(),
            "load_average_max": load,
            "contended": contended(load, cpus),
        }


def load_average() -> float | None:
    """The machine's 1-minute load average (runnable tasks); None where the system gives none."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def available_cpus() -> int:
    """The CPUs this process may run on (a container's or taskset's share, not the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def contended(load: float | None, cpus: int) -> bool:
    """More runnable tasks than CPUs, by more than this run's own start-up or a passing blip."""
    return load is not None and load > cpus + 0.5


_warned_busy = False


def warn_if_busy(log) -> None:
    """Once a process, before training: a machine busier than its CPUs makes every speed figure of the run slow
    (tokens/s, seconds, the time left), which the record says only after the fact (MachineLoad)."""
    global _warned_busy
    load, cpus = load_average(), available_cpus()
    if _warned_busy or not contended(load, cpus) or not distributed.is_main():  # torchrun: one process says it
        return
    _warned_busy = True
    log.warning(
        "the machine is busy: a load average of %.1f over the last minute on the %s this run may use; every "
        "speed figure of this run (tokens/s, seconds, time left) will be slower than on an idle machine",
        load, count(cpus, "CPU"),
    )  # fmt: skip


@dataclass
class Hardware:
    device: torch.device
    precision: str  # fp32 | bf16 | fp16
    loss_chunk_tokens: int = 0  # see transfer.training.loss
    kernels: str = "torch"  # torch | liger: whose kernels (transfer/transforms.py), and so whose training loss

    def autocast(self):
        dtype = AUTOCAST_DTYPES[self.precision]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """Loss scaling only for fp16, whose narrow range underflows small gradients."""
        return torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")

    @contextlib.contextmanager
    def explain_out_of_memory(self, doing: str, fixes: list[str]):
        """The device running out of memory becomes a one-line error naming the settings and what would fit.

        The failed step's tensors are freed once the job's error is handled; cli.job then
        empties the CUDA cache, so the next job of a sweep gets the memory back.
        """
        try:
            yield
        except torch.OutOfMemoryError as e:
            tried = re.search(r"Tried to allocate [\d.]+ \w+", str(e))
            if self.precision == "fp32":
                fixes = [*fixes, "hardware.precision=bf16"]
            detail = f" ({tried.group(0)})" if tried else ""
            raise OutOfMemory(f"out of memory on {self.device} {doing}{detail}; to fit: {', '.join(fixes)}") from None

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def reset_peak_memory(self) -> None:
        """Start a run's peak from now: the counters outlive a job when a sweep runs jobs in one process."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:  # Linux: "5" resets the process's peak resident set size (VmHWM)
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass

    def peak_memory(self) -> dict:
        if self.device.type == "cuda":
            return {
                "bytes": torch.cuda.max_memory_allocated(self.device),
                "reserved_bytes": torch.cuda.max_memory_reserved(self.device),
                "kind": "cuda_max_memory_allocated",
            }
        peak = proc_bytes("/proc/self/status", "VmHWM")
        if peak is not None:
            return {"bytes": peak, "kind": "cpu_peak_rss"}
        # elsewhere the process-lifetime peak (kilobytes on Linux, bytes on macOS)
        return {"bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "kind": "cpu_peak_rss_process"}


# glibc's own starting threshold (128 KiB): allocations at least this large are mapped apart and unmapped when freed
MMAP_THRESHOLD = 128 * 1024
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)


def return_freed_memory() -> bool:
    """Make glibc give a freed tensor's memory back to the system at once; False where it cannot (no glibc).

    glibc raises its mmap threshold each time it unmaps a freed block, up to 32 MiB: after a step has freed its
    activations, every tensor below that size comes from its heaps, which keep what is freed in the middle of them.
    On Qwen2.5-Coder-0.5B (LoRA, micro-batch 2 x 128) the resident set grew by 1.0 GB after the first step and by
    0.5 GB more after the second, none of it in use, and the final evaluation's logits came on top of it: a peak
    1.3 GB above the first step's (docs/benchmarks.md). Set once, the threshold stays put.
    """
    try:
        libc = ctypes.CDLL(None)
        if not hasattr(libc, "gnu_get_libc_version"):  # musl, macOS: their own allocators
            return False
        return libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    except (OSError, TypeError):  # no C library to open by that name (Windows)
        return False


def resident_bytes() -> int | None:
    """This process's resident set now (Linux); None elsewhere."""
    return proc_bytes("/proc/self/status", "VmRSS")


def proc_bytes(path: str, field: str) -> int | None:
    """A Linux /proc file's `field:  N kB` in bytes; None elsewhere."""
    file = Path(path)
    if file.is_file():
        for line in file.read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    return None


def resolve(cfg) -> Hardware:
    """The `hardware` config made concrete; refuses what this machine cannot do."""
    wanted = cfg.device.value
    if wanted == "cuda" and not torch.cuda.is_available():
        raise TransferError(
            "hardware.device=cuda but no CUDA device is available here; allowed on this machine: auto, cpu"
        )
    on_gpu = wanted == "cuda" or (wanted == "auto" and torch.cuda.is_available())
    device = torch.device("cuda", distributed.gpu_index()) if on_gpu else torch.device("cpu")  # torchrun: one GPU each
    precision = cfg.precision.value
    if precision == "auto":  # bf16 where the GPU computes it natively; a CPU gains nothing from it
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise TransferError(
            f"hardware.precision=bf16 is not supported by {torch.cuda.get_device_name(device)}; allowed: fp32, fp16"
        )
    if cfg.num_threads is not None and device.type == "cpu":
        torch.set_num_threads(cfg.num_threads)
    return Hardware(device, precision, cfg.loss_chunk_tokens, cfg.kernels.value)


def uncompiled():
    """Compiled blocks run as plain PyTorch inside: for generation, whose cache changes shape at every token,
    and for forward hooks, which would each make torch.compile compile again."""
    if not hasattr(torch.compiler, "set_stance"):  # torch < 2.6: compiled blocks compile for these too
        return contextlib.nullcontext()
    return torch.compiler.set_stance("force_eager")

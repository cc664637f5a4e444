"""The hardware group: where and how a run computes (device, precision, kernels, compiling, memory), and its
checks, asked without importing torch: a GPU where the config needs one, the packages a setting needs."""

import importlib.util
import os
import shutil
from dataclasses import dataclass
from enum import Enum

from omegaconf import MISSING, DictConfig

from transfer.config import preflight
from transfer.config.strategy import STRATEGIES
from transfer.errors import TransferError

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


class Device(Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Precision(Enum):
    auto = "auto"  # bf16 on a GPU that has it, else fp32
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class OnOutOfMemory(Enum):
    fail = "fail"
    halve = "halve"
    cpu = "cpu"


class MemoryCheck(Enum):
    refuse = "refuse"
    warn = "warn"


class Attention(Enum):
    auto = "auto"  # transformers' choice: sdpa where the model has it, else eager
    sdpa = "sdpa"
    eager = "eager"
    flash_attention_2 = "flash_attention_2"


class Kernels(Enum):
    torch = "torch"  # PyTorch's own operations, and our fused loss (transfer/training/loss.py)
    liger = "liger"  # Liger's Triton kernels: RMSNorm, SwiGLU, RoPE and fused linear cross-entropy (a CUDA GPU)


@dataclass
class HardwareConfig:
    name: str = MISSING
    device: Device = Device.auto
    precision: Precision = Precision.fp32
    # CPU threads for torch; null keeps torch's default.
    num_threads: int | None = None
    # Compute the head and the loss over chunks of at most this many tokens, with the
    # head's gradients fused into the loss, so that the full logits never exist at once
    # (0: autograd's path over the whole logits). See transfer/training/loss.py.
    loss_chunk_tokens: int = 4096
    # Out of GPU memory: fail with one line saying what would fit; halve the micro-batch and
    # double the accumulation (the same batch per step) and retry, down to 1, as evaluation halves
    # eval_batch_size; or go on on the CPU from the last good state.
    on_oom: OnOutOfMemory = OnOutOfMemory.halve
    # Recompute each block's activations in the backward pass instead of keeping them: less memory, more time.
    gradient_checkpointing: bool = False
    # The attention kernel: auto (transformers' choice: sdpa where the model has it, else eager), sdpa,
    # eager, or flash_attention_2 (the flash-attn package; a CUDA GPU in bf16 or fp16).
    attention: Attention = Attention.auto
    # torch.compile each decoder block (regional: the blocks share one compiled graph). The first step and
    # the first evaluation pay for compiling (the record's training.warmup_seconds); samples run uncompiled.
    compile: bool = False
    # torch.compile's mode: default, reduce-overhead (CUDA graphs), max-autotune, max-autotune-no-cudagraphs.
    compile_mode: str = "default"
    # The kernels of the blocks' norms, MLPs and rotary embeddings and of the training loss: torch, or liger
    # (the liger-kernel package, on a CUDA GPU; transfer/training/speed.py).
    kernels: Kernels = Kernels.torch
    # GiB a run may use; null: what the device has free when the run starts. An estimated peak
    # above it is one warning line with the settings that would fit (transfer/training/memory.py).
    memory_limit: float | None = None
    # An estimated peak more than twice the memory (memory_limit, or what is free): refuse the run before its
    # weights are read, in one line with the settings that would fit, unless on_oom can act there (on a GPU:
    # cpu, or halve when batches of one fit); warn: one warning line, and the run tries. A dry run is never refused.
    memory_check: MemoryCheck = MemoryCheck.refuse
    # Estimate the peak on fake tensors before loading the weights (a few seconds for a 0.5B model).
    estimate_memory: bool = True
    # On a CPU under glibc, give what a tensor frees back to the system at once (a fixed mmap threshold) rather
    # than hold it to the run's end: for a run short of memory. Its page faults cost speed: Qwen2.5-Coder-0.5B LoRA
    # trained at 0.77x its tokens/s with it for 0.85x the peak (docs/speed.md), the tiny model 40 % slower.
    return_freed_memory: bool = False


# options of the group -> the schema class their YAML names (schema/hardware/<option>)
SCHEMA = {"base": HardwareConfig}


def check_hardware_values(hw: DictConfig) -> None:
    threads = hw.num_threads
    if threads is not None and threads < 1:
        raise TransferError(f"hardware.num_threads={threads} must be at least 1 (or null for torch's default)")
    if hw.loss_chunk_tokens < 0:
        raise TransferError(
            f"hardware.loss_chunk_tokens={hw.loss_chunk_tokens}: allowed 0 (off) or a positive number of tokens"
        )
    limit = hw.memory_limit
    if limit is not None and not limit > 0:
        raise TransferError(f"hardware.memory_limit={limit} must be a positive number of GiB (or null: what is free)")


def check_hardware(cfg: DictConfig) -> None:
    """A GPU where the config needs one, no fp16 on the CPU, what compiling and the attention kernel need,
    asked without importing torch."""
    hw = cfg.hardware
    device, precision = hw.device.value, hw.precision.value
    check_compile(hw)
    flash = check_attention(hw)
    liger = hw.kernels.value == "liger"
    if liger and device == "cpu":
        raise TransferError("hardware.kernels=liger runs Triton kernels on a CUDA GPU, not hardware.device=cpu; "
                            "allowed there: torch")  # fmt: skip
    if liger and (importlib.util.find_spec("liger_kernel") is None or importlib.util.find_spec("triton") is None):
        raise TransferError(
            "hardware.kernels=liger needs the liger-kernel package (and triton), which is not installed here "
            "(pip install -e '.[liger]'); allowed without it: torch"
        )
    # the settings that run on a CUDA GPU only, and what is allowed instead
    gpu_only = [(setting, allowed) for setting, on, allowed in (
        ("hardware.attention=flash_attention_2", flash, "auto, sdpa, eager"),
        ("hardware.kernels=liger", liger, "torch"),
    ) if on]  # fmt: skip
    if gpu_only and hw.on_oom.value == "cpu":
        raise TransferError(
            f"hardware.on_oom=cpu would go on on the CPU, where {gpu_only[0][0]} cannot run; allowed with it: fail, "
            "halve"
        )
    strategy = cfg.strategy.name
    four_bit = STRATEGIES[strategy].four_bit
    if four_bit and hw.on_oom.value == "cpu":  # the CPU computes in fp32 (transfer/training/oom.py)
        raise TransferError(
            f"hardware.on_oom=cpu would cast the weights to fp32 on the CPU, and strategy={strategy}'s 4-bit weights "
            "cannot be cast; allowed with it: fail, halve"
        )
    needs_cuda = device == "cuda" or four_bit or bool(gpu_only)
    cuda = preflight.cuda_available() if needs_cuda or device == "auto" else False
    if cuda is not False:
        return
    if gpu_only:
        setting, allowed = gpu_only[0]
        raise TransferError(f"{setting} needs a CUDA GPU and there is none here; allowed: {allowed}")
    if device == "cuda":
        raise TransferError(
            "hardware.device=cuda but no CUDA device is available here; allowed on this machine: auto, cpu"
        )
    if four_bit:
        raise TransferError(
            f"strategy={strategy} needs a CUDA GPU (bitsandbytes 4-bit weights) and there is none here; use strategy=lora"
        )
    if precision == "fp16":
        raise TransferError(
            f"hardware.precision=fp16 on the CPU (hardware.device={device}): allowed there fp32 or bf16; "
            "fp16 autocast is slow on CPUs and needs loss scaling"
        )


def check_attention(hw: DictConfig) -> bool:
    """flash_attention_2's package, GPU and half precision; True when it is chosen."""
    flash = hw.attention.value == "flash_attention_2"
    if flash and hw.device.value == "cpu":
        raise TransferError(
            "hardware.attention=flash_attention_2 runs on a CUDA GPU, not hardware.device=cpu; allowed there: "
            "auto, sdpa, eager"
        )
    if flash and importlib.util.find_spec("flash_attn") is None:
        raise TransferError(
            "hardware.attention=flash_attention_2 needs the flash-attn package, which is not installed here "
            "(pip install flash-attn); allowed without it: auto, sdpa, eager"
        )
    if flash and hw.precision.value == "fp32":
        raise TransferError(
            "hardware.attention=flash_attention_2 computes in half precision only; allowed with it: "
            "hardware.precision=auto, bf16 or fp16"
        )
    return flash


def check_compile(hw: DictConfig) -> None:
    if hw.compile_mode not in COMPILE_MODES:
        raise TransferError(f"hardware.compile_mode={hw.compile_mode!r}: allowed {', '.join(COMPILE_MODES)}")
    if hw.compile_mode != "default" and not hw.compile:
        raise TransferError(
            f"hardware.compile_mode={hw.compile_mode} has no effect without hardware.compile=true; set both"
        )
    # torch.compile's code generators build C++ (CPU), or Triton's kernel launchers (GPU), with the system's compiler
    compiler = os.environ.get("CXX") or "g++"
    if hw.compile and not any(shutil.which(c) for c in (compiler, "c++", "clang++")):
        raise TransferError(
            f"hardware.compile=true needs a C++ compiler ({compiler}, c++ or clang++, or $CXX) and none is on PATH; "
            "install one or set hardware.compile=false"
        )

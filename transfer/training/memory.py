"""The memory a run will need, known before it loads a weight: one training step and one evaluation batch,
run on fake tensors (PyTorch's FakeTensorMode: shapes and dtypes, no storage) under a dispatch mode that
counts the bytes of every live storage, by kind: weights, gradients, optimizer state, and activations with
the step's temporaries.

What runs is the run's own step: the model built from its config with the strategy and the
transforms applied, the objective's token loss (the fused head loss, in chunks), the optimizer's
first and then a tracked second step (its state exists from the first on), under the run's
autocast. On a CUDA machine the fake tensors are CUDA tensors, so CUDA's kernels (flash attention)
decide what is kept; elsewhere the CPU's, and the record says which. On a CPU the weight-change
diagnostics' copy of the weights that train is counted too: it is in the same memory there (2 GB
for Qwen2-0.5B's full fine-tuning, docs/qwen.md). Not counted: the CUDA context
and the allocator's reserve (`torch.cuda.max_memory_allocated` does not count them either).

On a CPU the measured peak is the process's resident set (VmHWM), which holds the interpreter, the libraries and
the tokenizer besides the tensors: 0.64 GB of it for Qwen2.5-Coder-0.5B's LoRA once estimated, 0.26 GB of that
torch and transformers, the rest the tokenizer, the model's code and peft. `resident_peak_bytes` adds the resident set measured as the estimate ends
to the tensors' `peak_bytes`; what the run imports and reads after it (the data, its libraries, the tokenizer
loaded again) is not counted: 0.1 to 0.2 GB on that model. `peak_bytes` stays the tensors' alone, the figure a GPU's allocator counts, and the one
judged against what is free (MemAvailable leaves out what this process holds already).

Approximations, said in the record: instruction tuning's masked positions are counted as scored
(an upper bound on the head's share); preference objectives as a pair's two rows a step, with a
frozen reference copy's weights added where there is one; QLoRA's 4-bit weights by their size
(bitsandbytes quantizes only real weights), the rest as LoRA's.
"""

import contextlib
import logging
import math
import os
import weakref
from collections import Counter

import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.weak import WeakIdKeyDictionary

from transfer.errors import TransferError, first_line

log = logging.getLogger(__name__)


def estimate(cfg, shapes, device: torch.device, precision: str) -> dict:
    """Peak bytes of a training step and of an evaluation batch, by component, for this config on `device`.

    `shapes`: the config's model on the meta device (models.load_model_and_tokenizer with weights=False),
    adapted here by the strategy: it is used up.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    from transfer.config.objective import OBJECTIVES
    from transfer.config.optimizer import learning_rate
    from transfer.config.strategy import STRATEGIES
    from transfer.models.anatomy import base_model
    from transfer.strategies import apply_strategy
    from transfer.training import loss
    from transfer.training.hardware import AUTOCAST_DTYPES
    from transfer.training.optim import build_optimizer
    from transfer.training.speed import apply_transforms

    objective = OBJECTIVES[cfg.objective.name]
    rows = cfg.micro_batch_size * objective.rows_per_example
    fake_device = device if device.type == "cpu" or torch.cuda.is_available() else torch.device("cpu")
    autocast = AUTOCAST_DTYPES[precision]
    notes = []
    strategy, spec = cfg.strategy, STRATEGIES[cfg.strategy.name]
    if spec.estimate_as:  # QLoRA: LoRA on the full-precision base stands in; the weights are corrected below
        strategy = strategy.copy()
        strategy.name = spec.estimate_as
    # adapted on the meta device (peft moves fake parameters by swapping them, which fails), then given fake
    # storage on the run's device
    with torch.device("meta"):
        model, _ = apply_strategy(shapes, strategy, seed=0)
    # outside the fake mode: a library it imports (Liger's) would keep fake tensors made at import
    apply_transforms(model, cfg, estimate=True)
    with FakeTensorMode(allow_non_fake_inputs=True), torch.device(fake_device):
        model.to_empty(device=fake_device)
        base = base_model(model)
        base.tie_weights()  # to_empty gives each module its own tensor: a tied head shares the embedding's again
        if cfg.hardware.compile:
            notes.append("compiled blocks estimated as uncompiled ones: fused kernels keep fewer temporaries")
        if cfg.hardware.kernels.value == "liger":
            notes.append("Liger's kernels estimated as PyTorch's, and its loss as ours: an upper bound")
        model.train()
        loss.assume_plain_head(base)  # the probe compares values, which fake tensors lack; asked again in the run
        optimizer = build_optimizer(model, cfg.optimizer, fake_device, learning_rate(cfg)[0])
        ids = torch.randint(0, model.config.vocab_size, (rows, cfg.block_size))

        def forward(ids):
            with torch.autocast(fake_device.type, dtype=autocast, enabled=autocast is not None):
                total, count = loss.summed_lm_loss(model, ids, ids, cfg.hardware.loss_chunk_tokens)
            return total / count

        def backward(mean):
            mean.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        backward(forward(ids))  # the optimizer's state exists from its first step on
        training = _tracked(model, optimizer, lambda: forward(ids), backward)
        eval_ids = torch.randint(0, model.config.vocab_size, (cfg.eval_batch_size, cfg.block_size))
        with torch.no_grad():
            evaluating = _tracked(model, optimizer, lambda: forward(eval_ids))
        weights = _bytes(model.parameters())
        if spec.four_bit:
            shrink = training_linear_bytes(base) - _qlora_weights(base)
            notes.append("QLoRA: 4-bit weights by their size, the rest as LoRA's")
            for found in (training, evaluating):
                found["weights"] -= shrink
                found["peak"] -= shrink
            weights -= shrink
        if objective.reference and not hasattr(model, "peft_config"):
            training["reference"] = weights  # the frozen copy of the initial model
            training["peak"] += weights
            notes.append("a preference objective's frozen reference copy")
        if fake_device.type == "cpu" and not hasattr(model, "peft_config"):
            _add_snapshot(model, (training, evaluating), notes)
        if objective.rows_per_example == 2:
            notes.append("a pair's two answers as two rows")
        if objective.family == "sft":
            notes.append("every position counted as scored: an upper bound on the head's share")
    found = {
        "training": training,
        "evaluation": evaluating,
        "peak_bytes": max(training["peak"], evaluating["peak"]),
        "on": f"{fake_device.type} (fake tensors)",
        "weights_bytes": weights,
        "notes": notes,
    }
    if device.type == "cpu":
        _add_process(found)
    return found


def _add_process(found: dict) -> None:
    """The resident set's peak, which a CPU run measures: the tensors' and the process's own memory as the estimate
    ends, whose libraries (peft among them), tokenizer and fake run's leftovers stay to the run's end."""
    from transfer.training.hardware import resident_bytes

    process = resident_bytes()
    if process is None:  # not Linux: no resident set to read
        return
    found["process_bytes"] = process
    found["resident_peak_bytes"] = found["peak_bytes"] + process
    found["notes"].append("the resident set's peak: the peak with the process's own memory when estimated (its "
                          "libraries, the tokenizer) besides")  # fmt: skip


def _add_snapshot(model, parts: tuple[dict, ...], notes: list[str]) -> None:
    """The weight-change diagnostics' copy of what trains (evaluation/diagnostics.snapshot), held on the CPU from the
    baseline to the end: in this process's memory on a CPU (the host's, not the GPU's, beside one)."""
    copy = _bytes(p for p in model.parameters() if p.requires_grad)
    for found in parts:
        found["snapshot"] = copy
        found["peak"] += copy
    notes.append("the weight-change diagnostics' CPU copy of the weights that train")


class _LiveBytes(TorchDispatchMode):
    """Bytes of live tensor storage by kind, and the kinds at the peak of their total.

    Every op's outputs are seen as they are made; a weak reference to each storage sees it freed. The
    model's tensors are weights, the optimizer's are its state, a parameter's accumulated gradient is a
    gradient (a hook relabels it), and everything else a step makes is an activation or a temporary.
    """

    def __init__(self, model, optimizer):
        super().__init__()
        self.kinds = WeakIdKeyDictionary()  # storage -> [kind, bytes]
        self.live, self.total, self.at_peak, self.peak = Counter(), 0, Counter(), 0
        for tensor in [*model.parameters(), *model.buffers()]:
            self.label(tensor, "weights")
        for state in optimizer.state.values():
            for tensor in state.values():
                if isinstance(tensor, torch.Tensor):
                    self.label(tensor, "optimizer")
        self.hooks = [p.register_post_accumulate_grad_hook(lambda p: self.label(p.grad, "gradients"))
                      for p in model.parameters() if p.requires_grad]  # fmt: skip

    def label(self, tensor, kind: str) -> None:
        storage = tensor.untyped_storage()
        info = self.kinds.get(storage)
        if info is None:
            info = self.kinds[storage] = [kind, storage.nbytes()]
            weakref.finalize(storage, self._freed, info)
            self.live[kind] += info[1]
            self.total += info[1]
        elif info[0] != kind:
            self.live[info[0]] -= info[1]
            self.live[kind] += info[1]
            info[0] = kind
        if self.total > self.peak:
            self.peak, self.at_peak = self.total, self.live.copy()

    def _freed(self, info) -> None:
        self.live[info[0]] -= info[1]
        self.total -= info[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.untyped_storage() not in self.kinds:
                self.label(tensor, "activations")
        return out

    def __exit__(self, *exc):
        for hook in self.hooks:
            hook.remove()
        return super().__exit__(*exc)


def _tracked(model, optimizer, forward, backward=None) -> dict:
    """The kinds at the peak; what each block's forward keeps, and what the head and the loss add after the blocks."""
    from transfer.models.anatomy import model_parts

    blocks = model_parts(model).blocks
    kept, after_blocks = [], []  # the first forward pass's, not checkpointing's recomputation
    with _LiveBytes(model, optimizer) as tracker:
        handles = [
            *(b.register_forward_pre_hook(lambda m, a: kept.append(-tracker.total)) for b in blocks),
            *(b.register_forward_hook(lambda m, a, o: kept.append(kept.pop() + tracker.total)) for b in blocks),
            blocks[-1].register_forward_hook(lambda m, a, o: after_blocks.append(tracker.total)),
        ]
        mean = forward()
        forward_peak = tracker.peak
        if backward is not None:
            backward(mean)
        for handle in handles:
            handle.remove()
    return {
        **{kind: tracker.at_peak[kind] for kind in KINDS},
        "peak": tracker.peak,
        "activations_per_block": round(sum(kept[: len(blocks)]) / len(blocks)),
        "head_and_loss": forward_peak - after_blocks[0],  # one chunk of logits and its loss at a time
    }


KINDS = ("weights", "gradients", "optimizer", "activations")


def _bytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def _linear_weights(base):
    """The blocks' linear weights that bitsandbytes would quantize (LoRA's own matrices left out)."""
    from transfer.models.anatomy import model_parts

    for block in model_parts(base).blocks:
        for name, module in block.named_modules():
            if isinstance(module, torch.nn.Linear) and "lora_" not in name:
                yield module.weight


def training_linear_bytes(base) -> int:
    return _bytes(_linear_weights(base))


def _qlora_weights(base) -> int:
    """NF4 weights: half a byte each, with double-quantized scales (about 0.127 bits each)."""
    n = sum(w.numel() for w in _linear_weights(base))
    return math.ceil(n * (4 + 0.127) / 8)


def memory_limit(cfg, device: torch.device) -> int | None:
    """hardware.memory_limit in bytes, or what the device has free now."""
    if cfg.hardware.memory_limit is not None:
        return int(cfg.hardware.memory_limit * 2**30)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    from transfer.training.hardware import proc_bytes

    return proc_bytes("/proc/meminfo", "MemAvailable")


# An estimate above the memory by more than this factor refuses the run (hardware.memory_check=refuse). On the CPU
# the estimate came within 4% of what the allocator held (docs/benchmarks.md; tests/test_memory.py holds it to 5%); on
# a GPU it is not measured yet (the benchmark's target is 15%). The approximations its notes name as upper bounds
# overstate (compiled blocks, Liger's kernels, instruction tuning's unscored positions), and what it leaves out (CUDA's
# context, the allocator's reserve, the process's libraries) only adds to the real peak. So a run refused at twice
# the memory would have needed an estimate twice too high to fit; between 1x and 2x the run is warned, not refused.
FAR_OVER = 2.0


def fits_advice(cfg, found: dict, limit: int) -> str | None:
    """One line when the estimate exceeds the limit: what would fit, the same batch per step first."""
    if found["peak_bytes"] <= limit:
        return None
    return (
        f"the run's estimated peak, {found['peak_bytes'] / 2**30:.3g} GiB, exceeds the {limit / 2**30:.3g} GiB "
        f"available; to fit: {', '.join(_fixes(cfg, found, limit)) or 'a smaller block_size'} "
        f"(hardware.on_oom={cfg.hardware.on_oom.value} acts when it runs out)"
    )


def refusal(cfg, found: dict, limit: int, device: torch.device) -> str | None:
    """The line that refuses a run whose estimate is more than FAR_OVER times the limit; None to let it try.

    It tries when told to (hardware.memory_check=warn), and where hardware.on_oom can act: on a GPU, whose
    allocator raises an error the run can catch, with on_oom=cpu, or with on_oom=halve when the sizes halving
    reaches (micro-batch and evaluation batch of 1) fit. On the CPU nothing can act: the kernel ends a process
    that takes more than the machine has, record and all.
    """
    if cfg.hardware.memory_check.value != "refuse" or found["peak_bytes"] <= FAR_OVER * limit:
        return None
    policy = cfg.hardware.on_oom.value
    if device.type == "cuda" and policy == "cpu":
        return None
    if device.type == "cuda" and policy == "halve":
        smallest = _at_batch_of_one(cfg, found)
        if smallest <= FAR_OVER * limit:
            return None
        why = f"halving to batches of one still needs {smallest / 2**30:.3g} GiB, so hardware.on_oom=halve cannot help"
    elif device.type == "cuda":
        why = "hardware.on_oom=fail"
    else:
        why = f"hardware.on_oom={policy} cannot act on the CPU, where the kernel ends a process that runs out"
    return (
        f"the run's estimated peak, {found['peak_bytes'] / 2**30:.3g} GiB, is more than {FAR_OVER:g}x the "
        f"{limit / 2**30:.3g} GiB available on {device.type}; to fit: "
        f"{', '.join(_fixes(cfg, found, limit)) or 'a smaller block_size'}; refused before loading the weights "
        f"({why}; hardware.memory_check=warn runs it anyway)"
    )


def _at_batch_of_one(cfg, found: dict) -> int:
    """The estimated peak once halving has brought the micro-batch and the evaluation batch down to 1."""
    training, evaluating = found["training"], found["evaluation"]
    fixed = _held(training)
    at_one = [fixed + (training["peak"] - fixed) / cfg.micro_batch_size]
    fixed = _held(evaluating)
    at_one.append(fixed + (evaluating["peak"] - fixed) / cfg.eval_batch_size)
    return round(max(at_one))


def _held(part: dict) -> int:
    """What a step or an evaluation batch holds whatever the batch size: weights, gradients, optimizer state, and
    the copies beside them (a reference model, the diagnostics' snapshot)."""
    return sum(part.get(kind, 0) for kind in ("weights", "gradients", "optimizer", "reference", "snapshot"))


def _fixes(cfg, found: dict, limit: int) -> list[str]:
    """The settings that bring the estimate under the limit, the same batch per step first."""
    fixes = []
    training, evaluating = found["training"], found["evaluation"]
    if training["peak"] > limit:
        fixed = _held(training)
        micro = _halved_to_fit(cfg.micro_batch_size, fixed, training["peak"] - fixed, limit)
        if micro:
            accum = cfg.grad_accum_steps * cfg.micro_batch_size // micro
            fixes.append(f"micro_batch_size={micro} grad_accum_steps={accum} (the same batch per step)")
        if not cfg.hardware.gradient_checkpointing:
            fixes.append("hardware.gradient_checkpointing=true")
        if fixed > limit:
            fixes.append("a strategy that trains less (lora, qlora)")
    if evaluating["peak"] > limit:
        fixed = _held(evaluating)
        size = _halved_to_fit(cfg.eval_batch_size, fixed, evaluating["peak"] - fixed, limit)
        if size:
            fixes.append(f"eval_batch_size={size}")
    return fixes


def _halved_to_fit(size: int, fixed: int, moving: int, limit: int) -> int | None:
    """The largest halving of a batch size whose share (`moving` scales with it) fits beside `fixed`; None if none."""
    for smaller in (size // 2**k for k in range(1, size.bit_length())):
        if fixed + moving * smaller / size <= limit:
            return smaller
    return None


def safe_estimate(cfg, shapes, device, precision) -> dict | None:
    """The estimate, or None with a log line when the fake run cannot model this config (a custom kernel)."""
    try:
        with open(os.devnull, "w") as quiet, contextlib.redirect_stderr(quiet):
            return estimate(cfg, shapes, device, precision)
    except TransferError:  # a setting this model cannot take: said before its weights are read
        raise
    except Exception as e:  # an estimate is advice: a run never fails for want of one
        log.info("no memory estimate for this config: %s: %s", type(e).__name__, first_line(e))
        return None

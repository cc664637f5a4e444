"""Memory: gradient checkpointing, halving on out-of-memory, the precision a GPU gets by default."""

import ctypes
import re
import subprocess
import sys

import pytest
import torch
from conftest import loss_and_grads

from transfer.config.compose import compose_config
from transfer.models.load import load_model_and_tokenizer
from transfer.strategies import apply_strategy
from transfer.training.speed import apply_transforms


def saved_for_backward(model, ids) -> int:
    """Bytes of the tensors autograd keeps from one forward pass for the backward pass."""
    from transfer.training.loss import summed_lm_loss

    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = summed_lm_loss(model, ids, ids, chunk_tokens=4096)
    loss.backward()
    return total


@pytest.mark.parametrize("strategy", ["full", "lora"])
def test_gradient_checkpointing_keeps_less_and_computes_the_same(strategy):
    ids = torch.randint(0, 257, (4, 128), generator=torch.Generator().manual_seed(0))
    results = {}
    for on in (False, True):
        cfg = compose_config([f"strategy={strategy}", "strategy.dropout=0" if strategy == "lora" else "seed=1234",
                              f"hardware.gradient_checkpointing={str(on).lower()}"])  # fmt: skip
        model, _ = load_model_and_tokenizer(cfg.model, 128)
        torch.manual_seed(0)  # LoRA's A matrices start random: the same in both, as a run's seed makes them
        model, _ = apply_strategy(model, cfg.strategy, seed=0)
        assert apply_transforms(model, cfg) == {
            "attention": "sdpa",
            "kernels": "torch",
            "gradient_checkpointing": on,
            "compiled": None,
        }
        model.train()
        results[on] = (saved_for_backward(model, ids), loss_and_grads(model, ids, ids, 4096))
    (kept_plain, (loss_plain, _, grads_plain)), (kept_ckpt, (loss_ckpt, _, grads_ckpt)) = results[False], results[True]
    assert kept_ckpt < 0.5 * kept_plain  # each block keeps its input, not its insides
    torch.testing.assert_close(loss_ckpt, loss_plain, rtol=1e-6, atol=0)
    for name in grads_plain:
        torch.testing.assert_close(grads_ckpt[name], grads_plain[name], rtol=1e-5, atol=1e-7, msg=name)


def test_auto_precision_is_bf16_on_a_gpu_that_has_it_and_fp32_elsewhere(monkeypatch):
    from transfer.training import hardware

    cfg = compose_config([]).hardware
    assert hardware.resolve(cfg).precision == ("bf16" if torch.cuda.is_available() else "fp32")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert hardware.resolve(cfg).precision == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # an older GPU: fp32, no loss scaling
    assert hardware.resolve(cfg).precision == "fp32"


def _train_with_memory_of(rows_that_fit: int, overrides: list[str], monkeypatch):
    """Train in-process while a 'device' holds at most `rows_that_fit` rows a forward pass (as CUDA's allocator raises)."""
    import transfer.objectives.base
    from transfer.objectives import build_objective
    from transfer.train import train
    from transfer.training.hardware import resolve
    from transfer.training.oom import MemoryPlan

    real = transfer.objectives.base.summed_lm_loss

    def bounded(model, ids, labels, *args, **kwargs):
        if ids.shape[0] > rows_that_fit:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {ids.shape[0]} rows.")
        return real(model, ids, labels, *args, **kwargs)

    monkeypatch.setattr(transfer.objectives.base, "summed_lm_loss", bounded)
    cfg = compose_config(["block_size=64", "max_steps=6", "eval_interval=3", "eval.max_tokens=2048",
                          "optimizer.warmup_ratio=0", *overrides])  # fmt: skip
    model, tokenizer = load_model_and_tokenizer(cfg.model, cfg.block_size)
    objective = build_objective(cfg, tokenizer)
    splits = objective.prepare(cfg.eval.max_tokens)
    hardware = resolve(cfg.hardware)
    plan = MemoryPlan(cfg, hardware)
    result = train(model, objective, splits, cfg, hardware, plan=plan)
    monkeypatch.setattr(transfer.objectives.base, "summed_lm_loss", real)
    return result, plan, [p.detach().clone() for p in model.parameters()]


def test_out_of_memory_halves_the_micro_batch_and_makes_the_same_update(monkeypatch):
    halved, plan, weights = _train_with_memory_of(2, ["micro_batch_size=8", "grad_accum_steps=1"], monkeypatch)
    assert (plan.micro, plan.accum) == (2, 4)
    assert [e["change"] for e in plan.events] == [
        "micro_batch_size 8 -> 4, grad_accum_steps 1 -> 2 (the same batch per step)",
        "micro_batch_size 4 -> 2, grad_accum_steps 2 -> 4 (the same batch per step)",
    ]
    assert plan.events[0]["at"] == "training step 1" and "CUDA out of memory" in plan.events[0]["reason"]
    # the run that had 2 x 4 from the start: the same examples, the same losses, the same weights
    direct, _, direct_weights = _train_with_memory_of(2, ["micro_batch_size=2", "grad_accum_steps=4"], monkeypatch)
    assert halved["samples"] == direct["samples"] == 6 * 8
    for a, b in zip(halved["loss_curve"], direct["loss_curve"], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
    for a, b in zip(weights, direct_weights, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_out_of_memory_with_on_oom_fail_is_one_line_naming_what_would_fit(monkeypatch):
    from transfer.training.hardware import OutOfMemory

    with pytest.raises(OutOfMemory) as e:
        _train_with_memory_of(2, ["micro_batch_size=8", "hardware.on_oom=fail"], monkeypatch)
    assert str(e.value).startswith("out of memory on cpu training at micro_batch_size=8, block_size=64 (Tried to")
    assert "to fit: micro_batch_size=4 grad_accum_steps=2 (the same batch per step)" in str(e.value)
    # halving down to 1 still does not fit: the line names the sizes reached
    with pytest.raises(OutOfMemory) as e:
        _train_with_memory_of(0, ["micro_batch_size=4"], monkeypatch)
    assert "training at micro_batch_size=1, block_size=64" in str(e.value) and "to fit: block_size=32" in str(e.value)


def test_evaluation_out_of_memory_halves_eval_batch_size_and_scores_the_same(monkeypatch):
    import transfer.evaluation.perplexity
    from transfer.objectives import build_objective
    from transfer.training.hardware import resolve
    from transfer.training.oom import MemoryPlan

    cfg = compose_config(["block_size=64", "eval.max_tokens=4096", "eval_batch_size=16"])
    model, tokenizer = load_model_and_tokenizer(cfg.model, cfg.block_size)
    objective = build_objective(cfg, tokenizer)
    split = objective.prepare(cfg.eval.max_tokens)["validation"]
    hardware = resolve(cfg.hardware)
    whole = objective.evaluate(model, split, 4, hardware, "validation")
    real = transfer.evaluation.perplexity.summed_lm_loss

    def bounded(model, ids, *args, **kwargs):
        if ids.shape[0] > 4:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 GiB.")
        return real(model, ids, *args, **kwargs)

    monkeypatch.setattr(transfer.evaluation.perplexity, "summed_lm_loss", bounded)
    plan = MemoryPlan(cfg, hardware)
    result = plan.evaluate(lambda size: objective.evaluate(model, split, size, hardware, "validation"), "validation")
    assert plan.eval_batch_size == 4 and [e["change"] for e in plan.events] == [
        "eval_batch_size 16 -> 8",
        "eval_batch_size 8 -> 4",
    ]
    assert result["loss"] == pytest.approx(whole["loss"], rel=1e-9) and result["tokens"] == whole["tokens"]
    # an evaluator that raises the device's own error, where halving cannot help: one line, as training's
    from transfer.training.hardware import OutOfMemory

    def never_fits(size):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 GiB.")

    plan.eval_batch_size = 1
    with pytest.raises(OutOfMemory) as e:
        plan.evaluate(never_fits, "final test evaluation")
    assert str(e.value) == (
        "out of memory on cpu in the final test evaluation at eval_batch_size=1 (Tried to allocate 1 GiB); "
        "to fit: a smaller block_size, hardware.precision=bf16"
    )


# ---------------------------------------------------------------- the estimate before a run
def _estimate(overrides: list[str]):
    from transfer.training.hardware import resolve
    from transfer.training.memory import estimate

    cfg = compose_config(overrides)
    shapes, _ = load_model_and_tokenizer(cfg.model, cfg.block_size, weights=False)
    hardware = resolve(cfg.hardware)
    return cfg, estimate(cfg, shapes, hardware.device, hardware.precision)


def _allocated_peak(fn, folder) -> int:
    """The most bytes the CPU allocator held at once while `fn` ran, beyond what it held before (the profiler's count)."""
    import json

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    prof.export_chrome_trace(str(folder / "trace.json"))
    events = json.loads((folder / "trace.json").read_text())["traceEvents"]
    return max(e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]")


def _storage_bytes(tensors) -> int:
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


@pytest.mark.parametrize("strategy", ["full", "lora"])
def test_the_estimate_is_within_5_percent_of_what_a_cpu_run_allocates(strategy, tmp_path):
    from transfer.evaluation.diagnostics import snapshot
    from transfer.objectives import build_objective
    from transfer.train import train
    from transfer.training.hardware import resolve

    overrides = [f"strategy={strategy}", "block_size=128", "micro_batch_size=4", "grad_accum_steps=1", "max_steps=2",
                 "eval.max_tokens=4096", "eval_batch_size=8", "eval/probes=[]"]  # fmt: skip
    cfg, found = _estimate(overrides)
    model, tokenizer = load_model_and_tokenizer(cfg.model, cfg.block_size)
    model, _ = apply_strategy(model, cfg.strategy, seed=0)
    objective = build_objective(cfg, tokenizer)
    splits = objective.prepare(cfg.eval.max_tokens)
    held = _storage_bytes([*model.parameters(), *model.buffers()])
    assert found["training"]["weights"] == held  # a tied head counted once
    # what the run's diagnostics copy before training and keep to the end: in the same memory on a CPU
    copy = _storage_bytes(snapshot(model).values())
    assert found["training"].get("snapshot", 0) == copy and (copy > 0) == (strategy == "full")
    peak = held + copy + _allocated_peak(lambda: train(model, objective, splits, cfg, resolve(cfg.hardware)), tmp_path)
    assert found["peak_bytes"] == pytest.approx(peak, rel=0.05)


def test_the_estimate_counts_what_each_strategy_and_objective_keeps():
    """Weights and optimizer state exactly; the reference copy, QLoRA's 4-bit weights, checkpointing's savings."""
    base = ["block_size=128", "micro_batch_size=4"]
    cfg, full = _estimate(["strategy=full", *base])
    cfg_lora, lora = _estimate(["strategy=lora", *base])
    for c, found in ((cfg, full), (cfg_lora, lora)):
        model, _ = load_model_and_tokenizer(c.model, c.block_size, weights=False)
        with torch.device("meta"):
            model, _ = apply_strategy(model, c.strategy, seed=0)
        trained = [p for p in model.parameters() if p.requires_grad]
        # AdamW: two moments per trained number, and a 4-byte step count per trained tensor
        assert found["training"]["optimizer"] == sum(8 * p.numel() + 4 for p in trained)
    _, dpo_full = _estimate(["strategy=full", "objective=dpo", *base])
    _, dpo_lora = _estimate(["strategy=lora", "objective=dpo", *base])
    assert dpo_full["training"]["reference"] == full["weights_bytes"]  # a frozen copy of the model
    assert "reference" not in dpo_lora["training"]  # LoRA's reference is its base with the adapters off
    assert dpo_lora["training"]["activations"] > 1.9 * lora["training"]["activations"]  # two answers a pair
    _, qlora = _estimate(["strategy=qlora", *base])
    assert qlora["training"]["weights"] < 0.5 * lora["training"]["weights"]
    _, checkpointed = _estimate(["strategy=full", "hardware.gradient_checkpointing=true", *base])
    assert checkpointed["training"]["activations"] < 0.6 * full["training"]["activations"]
    # a checkpointed block keeps only its input: micro-batch x block size x hidden width, in fp32
    assert checkpointed["training"]["activations_per_block"] == 4 * 128 * 128 * 4
    assert full["training"]["activations_per_block"] > 10 * 4 * 128 * 128 * 4
    _, sft = _estimate(["strategy=lora", "objective=sft", *base])
    assert sft["notes"][0] == "every position counted as scored: an upper bound on the head's share"


def test_on_a_cpu_the_estimate_adds_the_process_own_memory_that_the_measured_peak_holds(tmp_path, monkeypatch):
    """A CPU run's measured peak is its resident set (VmHWM): the libraries and the tokenizer besides the tensors. On
    the tiny model they are nearly all of it; on Qwen2.5-Coder-0.5B 0.64 GB, without which LoRA's measured peak was
    1.2x the estimate (docs/benchmarks.md). The process's part is its resident set as the estimate ends (not compared
    with the measured peak: on the tiny model the fake run's leftovers can exceed what training later holds)."""
    import transfer.training.hardware as hardware
    from transfer.run import run_experiment

    read, real = [], hardware.resident_bytes
    monkeypatch.setattr(hardware, "resident_bytes", lambda: read.append(real()) or read[-1])
    overrides = ["strategy=lora", "block_size=64", "micro_batch_size=2", "eval_batch_size=2", "max_steps=1",
                 "eval_interval=0", "eval.max_tokens=128", "eval/probes=[]", "eval.max_new_tokens=1",
                 "checkpoint.enabled=false"]  # fmt: skip
    record = run_experiment(compose_config(overrides), tmp_path / "run", {"model": "tiny"})
    found, measured = record["memory_estimate"], record["memory"]
    assert measured["kind"] == "cpu_peak_rss" and found["process_bytes"] in read and found["process_bytes"] > 0
    assert found["resident_peak_bytes"] == found["peak_bytes"] + found["process_bytes"]
    assert measured["bytes"] > 2 * found["peak_bytes"]  # the tensors' estimate alone is far under what was measured
    assert found["notes"][-1].startswith("the resident set's peak: the peak with the process's own memory")


FREED_GO_BACK = """
import ctypes
import torch
from transfer.training.hardware import resident_bytes, return_freed_memory

class MallocInfo(ctypes.Structure):  # glibc's struct mallinfo2 (malloc.h), field by field
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallocInfo
big = torch.ones(2**22)  # 16 MiB, mapped apart: freeing it raises the threshold above the tensors below
del big
assert return_freed_memory()
mapped, before = libc.mallinfo2().hblkhd, resident_bytes()
freed, kept = [], []
for _ in range(64):
    freed.append(torch.ones(2**20))  # 4 MiB, written: resident
    kept.append(torch.ones(2**10))  # 4 KiB in use between them: from the heap, whatever the threshold
assert libc.mallinfo2().hblkhd - mapped >= 64 * 4 * 2**20, "not mapped apart"
assert resident_bytes() - before >= 64 * 4 * 2**20 * 0.9
del freed
assert resident_bytes() - before < 16 * 2**20, "kept"
"""


@pytest.mark.skipif(not hasattr(ctypes.CDLL(None), "mallinfo2"), reason="glibc's allocator (Linux) keeps freed memory")
def test_freed_tensors_go_back_to_the_system_and_not_to_the_end_of_the_run():
    """glibc raises its mmap threshold to the size of each mapped block it frees (up to 32 MiB): tensors below that
    size come from its heaps then, where what is freed below blocks still in use stays resident. A training step
    frees such tensors by the hundred (docs/benchmarks.md: 1.3 GB held on Qwen2.5-Coder-0.5B after two steps).
    In a process of its own: the setting is for the process's life, and would slow this worker's later tests."""
    done = subprocess.run([sys.executable, "-c", FREED_GO_BACK], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_advice_halves_what_exceeds_the_limit_keeping_the_batch_per_step():
    from transfer.training.memory import fits_advice

    cfg, found = _estimate(["block_size=128", "micro_batch_size=8", "grad_accum_steps=2", "eval_batch_size=4"])
    t, e = found["training"], found["evaluation"]
    fixed = t["weights"] + t["gradients"] + t["optimizer"] + t["snapshot"]  # the CPU's copy for the diagnostics
    # room for a quarter of the training step's activations, and for all of evaluation's
    limit = fixed + (t["peak"] - fixed) // 4 + 1
    assert e["peak"] <= limit
    assert fits_advice(cfg, found, limit) == (
        f"the run's estimated peak, {found['peak_bytes'] / 2**30:.3g} GiB, exceeds the {limit / 2**30:.3g} GiB "
        "available; to fit: micro_batch_size=2 grad_accum_steps=8 (the same batch per step), "
        "hardware.gradient_checkpointing=true (hardware.on_oom=halve acts when it runs out)"
    )
    assert fits_advice(cfg, found, found["peak_bytes"]) is None
    advice = fits_advice(cfg, found, fixed // 2)  # not even the weights fit
    assert "micro_batch_size" not in advice and "a strategy that trains less (lora, qlora)" in advice


# a run of the tiny model whose micro-batch needs about 12 GiB: far over a 1 GiB limit, on any machine
TOO_BIG = ["hardware=cpu", "block_size=64", "micro_batch_size=4096", "eval_batch_size=16", "hardware.memory_limit=1"]


def test_a_run_far_too_big_is_refused_before_its_weights_are_read_with_settings_that_fit(tmp_path, monkeypatch):
    import transfer.run
    from transfer.errors import TransferError
    from transfer.record import read_record

    loaded = []  # the `weights` of each load: the estimate's shapes are built on the meta device, without them
    real = transfer.run.load_model_and_tokenizer

    def load(*args, **kwargs):
        loaded.append(kwargs.get("weights", True))
        return real(*args, **kwargs)

    monkeypatch.setattr(transfer.run, "load_model_and_tokenizer", load)
    with pytest.raises(TransferError) as e:
        transfer.run.run_experiment(compose_config(TOO_BIG), tmp_path / "run", {"model": "tiny"})
    line = str(e.value)
    assert loaded == [False]
    record = read_record(tmp_path / "run")
    assert record["status"] == "failed" and record["error"] == line
    assert record["memory_estimate"]["refused"] is True and record["memory_estimate"]["advice"] == line
    assert record["memory_estimate"]["peak_bytes"] > 2 * record["memory_estimate"]["limit_bytes"] == 2 * 2**30
    assert line.startswith("the run's estimated peak, ") and "is more than 2x the 1 GiB available on cpu" in line
    assert line.endswith("refused before loading the weights (hardware.on_oom=halve cannot act on the CPU, where the "
                         "kernel ends a process that runs out; hardware.memory_check=warn runs it anyway)")  # fmt: skip
    # the micro-batch it advises fits, by the same estimate, with the same examples per step
    advised = re.search(r"to fit: micro_batch_size=(\d+) grad_accum_steps=(\d+) \(the same batch per step\)", line)
    micro, accum = int(advised.group(1)), int(advised.group(2))
    assert micro * accum == 4096 and micro < 4096
    _, smaller = _estimate([*TOO_BIG, f"micro_batch_size={micro}", f"grad_accum_steps={accum}"])
    assert smaller["peak_bytes"] <= 2**30 < 2 * smaller["peak_bytes"]  # the largest halving that fits
    assert "\n" not in line


def test_a_dry_run_far_too_big_is_estimated_not_refused(tmp_path):
    from transfer.run import run_experiment

    record = run_experiment(compose_config([*TOO_BIG, "dry_run=true"]), tmp_path / "run", {"model": "tiny"})
    assert record["status"] == "dry_run"
    assert record["memory_estimate"]["advice"].startswith("the run's estimated peak, ")


def test_the_refusal_leaves_a_run_to_try_where_on_oom_can_act_or_when_told():
    from transfer.training.memory import fits_advice, refusal

    _, found = _estimate(TOO_BIG)
    cpu, cuda, limit = torch.device("cpu"), torch.device("cuda"), 2**30
    peak = found["peak_bytes"]

    def judged(overrides, device, limit=limit):
        return refusal(compose_config([*TOO_BIG, *overrides]), found, limit, device)

    assert peak > 2 * limit
    assert "hardware.on_oom=halve cannot act on the CPU" in judged([], cpu)
    assert "hardware.on_oom=cpu cannot act on the CPU" in judged(["hardware.on_oom=cpu"], cpu)
    assert judged(["hardware.memory_check=warn"], cpu) is None
    assert judged(["hardware.on_oom=cpu"], cuda) is None  # it goes on on the CPU when the GPU runs out
    assert judged([], cuda) is None  # halving to a micro-batch of 1 fits: the GPU's error lets it halve
    assert "(hardware.on_oom=fail; hardware.memory_check=warn" in judged(["hardware.on_oom=fail"], cuda)
    weights = found["training"]["weights"]  # below what even batches of one need: halving cannot help
    assert "halving to batches of one still needs" in judged([], cuda, limit=weights // 2)
    # within twice the limit the estimate's own approximations could explain it: a warning, not a refusal
    assert judged([], cpu, limit=int(peak / 1.9)) is None
    assert fits_advice(compose_config(TOO_BIG), found, int(peak / 1.9)).startswith("the run's estimated peak")


def test_on_oom_cpu_casts_half_precision_weights_to_the_fp32_it_records():
    """A GPU run of bf16 weights that goes on on the CPU: the record says cpu (fp32), and the weights, the optimizer's
    moments and the reference copy are fp32 then (the CPU runs no autocast), and the next step trains in it."""
    from pathlib import Path

    from transfer.objectives import build_objective
    from transfer.training.hardware import Hardware
    from transfer.training.loss import LossOptions
    from transfer.training.oom import MemoryPlan, optimizer_mover
    from transfer.training.optim import build_optimizer

    pairs = Path(__file__).resolve().parent / "data" / "pairs.jsonl"
    cfg = compose_config(["model.dtype=bfloat16", "hardware.on_oom=cpu", "objective=dpo", "dataset=text_files",
                          f"dataset.train_files=[{pairs}]", "block_size=64", "eval.max_tokens=512"])  # fmt: skip
    model, tokenizer = load_model_and_tokenizer(cfg.model, cfg.block_size)
    objective = build_objective(cfg, tokenizer)
    splits = objective.prepare(cfg.eval.max_tokens)
    hardware = Hardware(torch.device("cuda"), "bf16")  # the GPU the run was on; only the plan's bookkeeping reads it
    objective.attach(model, splits, cfg, hardware)  # full fine-tuning: a frozen copy of the model is the reference
    optimizer = build_optimizer(model, cfg.optimizer, torch.device("cpu"), 1e-3)

    def step():
        stream = objective.stream(splits["train"], 0, 0, 2)
        batch = objective.batch(splits["train"], stream, 2)
        objective.begin_step(model, [batch], hardware)
        loss_sum, _, _ = objective.loss(model, batch.to(hardware.device), LossOptions.of(hardware))
        loss_sum.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    hardware.device = torch.device("cpu")  # the step that made the moments in bf16, as on the GPU
    step()
    hardware.device = torch.device("cuda")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    plan = MemoryPlan(cfg, hardware)
    plan.movers = [model.to, optimizer_mover(optimizer), objective.to]
    plan.recover("training step 2", "OutOfMemoryError: CUDA out of memory")
    assert plan.record()["events"][0]["change"] == "moved from cuda (bf16) to cpu (fp32)"
    assert (hardware.device.type, hardware.precision) == ("cpu", "fp32")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    moments = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.is_floating_point()]
    assert moments and {v.dtype for v in moments} == {torch.float32}
    reference = objective.reference.frozen
    assert {p.dtype for p in reference.parameters()} == {torch.float32}
    before = [p.detach().clone() for p in model.parameters()]
    step()  # fused AdamW takes parameters and moments of one dtype only
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_a_run_resumes_with_the_memory_settings_changed():
    """A CPU run that ran short of memory is resumed with return_freed_memory=true: how memory is held and estimated
    does not change what is trained; a checkpoint from before the option existed resumes too."""
    from omegaconf import OmegaConf

    from transfer.config.folders import config_differences

    older = OmegaConf.to_container(compose_config([]), resolve=True, enum_to_str=True)
    del older["hardware"]["return_freed_memory"]
    changed = compose_config(["hardware.return_freed_memory=true", "hardware.estimate_memory=false"])
    assert config_differences(older, changed) == []
    assert config_differences(older, compose_config(["hardware.precision=bf16"])) == [
        ("hardware.precision", "auto", "bf16")
    ]

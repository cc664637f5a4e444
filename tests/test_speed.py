"""Speed levers (hardware.compile, hardware.attention): each computes what the plain run computes, and the
record says which was used. How much faster they are is a benchmark's question (docs/benchmarks.md)."""

import pytest
import torch
from conftest import loss_and_grads

from transfer.errors import TransferError
from transfer.models import load_model_and_tokenizer
from transfer.strategies import apply_strategy
from transfer.transforms import apply_transforms
from transfer.validate import check_config, compose_config

RUN = ["strategy=lora", "strategy.dropout=0", "block_size=64", "max_steps=4", "eval_interval=2",
       "eval.max_tokens=1024", "eval.max_new_tokens=3", "optimizer.warmup_ratio=0", "checkpoint.enabled=false",
       "hardware=cpu", "hardware.estimate_memory=false"]  # fmt: skip


def test_compiled_blocks_train_evaluate_and_sample_as_plain_ones(tmp_path):
    from torch._dynamo.utils import counters

    from transfer.run import run_experiment

    plain = run_experiment(compose_config(RUN), tmp_path / "plain", {})
    compiled_before = counters["stats"]["unique_graphs"]
    # with a sweep's cache, whose key runs the model too (compiled, once a layer, when it ran with a KV cache)
    compiled = run_experiment(compose_config([*RUN, "hardware.compile=true", f"cache.dir={tmp_path / 'cache'}"]),
                              tmp_path / "compiled", {})  # fmt: skip
    assert compiled["status"] == plain["status"] == "completed"
    # all of it compiled: torch.compile gave up on nothing (it would be listed, as "gave_up")
    assert compiled["transforms"]["compiled"] == {"what": "each decoder block", "blocks": 4, "mode": "default"}
    assert plain["transforms"]["compiled"] is None
    # the blocks did run compiled: torch.compile captured graphs for them (training's and evaluation's)
    assert counters["stats"]["unique_graphs"] >= compiled_before + 2
    for a, b in zip(compiled["train"]["loss_curve"], plain["train"]["loss_curve"], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    for split in ("validation", "test", "ref_python_docs"):
        after = compiled["eval"]["final"][split]["loss"]
        assert after == pytest.approx(plain["eval"]["final"][split]["loss"], rel=1e-5), split
    # greedy samples, generated uncompiled, say the same
    said = lambda record: [(s["completion"], s["completion_after"]) for s in record["samples"]]  # noqa: E731
    assert said(compiled) == said(plain) and len(said(plain)) == 3
    # compiling is paid in the first step, and the record says so
    assert compiled["train"]["warmup_seconds"] > plain["train"]["warmup_seconds"]


def test_a_sweeps_next_job_compiles_afresh_and_the_record_says_when_compile_gave_up(tmp_path, monkeypatch):
    from torch._dynamo.utils import counters

    from transfer import transforms
    from transfer.run import run_experiment

    cfg = compose_config([*RUN, "hardware.compile=true", "max_steps=2", "eval_interval=0"])
    first = run_experiment(cfg, tmp_path / "first", {})  # a sweep's first job, in the same process as the next
    assert "gave_up" not in first["transforms"]["compiled"]
    # the next job may compile a block's code once only (a limit of 1): evaluation's version is one too many
    monkeypatch.setattr(transforms, "RECOMPILE_LIMIT", 1)
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", torch._dynamo.config.recompile_limit)
    before = counters["stats"]["unique_graphs"]
    second = run_experiment(cfg, tmp_path / "second", {})
    assert counters["stats"]["unique_graphs"] > before  # compiled again, not left with the first job's versions
    (line,) = second["transforms"]["compiled"]["gave_up"]
    assert line.startswith("torch._dynamo hit config.recompile_limit (1)") and "function:" in line
    losses = lambda record: [point["loss"] for point in record["train"]["loss_curve"]]  # noqa: E731
    assert losses(second) == pytest.approx(losses(first), rel=1e-6)  # uncompiled from then on computes the same


@pytest.mark.parametrize("strategy", ["full", "lora"])
def test_eager_attention_computes_what_sdpa_computes(strategy):
    ids = torch.randint(0, 257, (4, 96), generator=torch.Generator().manual_seed(0))
    results = {}
    for kernel in ("auto", "eager"):
        cfg = compose_config([f"strategy={strategy}", f"hardware.attention={kernel}"])
        model, _ = load_model_and_tokenizer(cfg.model, 96)
        torch.manual_seed(0)
        model, _ = apply_strategy(model, cfg.strategy, seed=0)
        done = apply_transforms(model, cfg)
        assert done["attention"] == ("sdpa" if kernel == "auto" else "eager")
        model.eval()  # no dropout
        results[kernel] = loss_and_grads(model, ids, ids, 4096)
    (loss_sdpa, _, grads_sdpa), (loss_eager, _, grads_eager) = results["auto"], results["eager"]
    torch.testing.assert_close(loss_eager, loss_sdpa, rtol=1e-5, atol=0)
    for name, grad in grads_sdpa.items():  # the summed loss's gradients are large: their float error is too
        assert torch.linalg.norm(grads_eager[name] - grad) <= 1e-5 * torch.linalg.norm(grad), name


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["hardware.compile=true", "hardware.compile_mode=fastest"],
         "hardware.compile_mode='fastest': allowed default, reduce-overhead, max-autotune, max-autotune-no-cudagraphs"),
        (["hardware.compile_mode=max-autotune"],
         "hardware.compile_mode=max-autotune has no effect without hardware.compile=true; set both"),
        (["hardware.attention=flash_attention_2"], "hardware.attention=flash_attention_2 needs the flash-attn package"),
        (["hardware=cpu", "hardware.precision=bf16", "hardware.attention=flash_attention_2"],
         "hardware.attention=flash_attention_2 runs on a CUDA GPU, not hardware.device=cpu; allowed there: auto"),
    ],
)  # fmt: skip
def test_speed_settings_this_machine_cannot_use_are_one_line(overrides, message):
    if overrides[0].endswith("flash_attention_2") and __import__("importlib").util.find_spec("flash_attn"):
        pytest.skip("flash-attn is installed here")
    with pytest.raises(TransferError) as e:
        check_config(compose_config(overrides))
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_compile_without_a_cxx_compiler_is_one_line(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(TransferError, match=r"^hardware.compile=true needs a C\+\+ compiler \(g\+\+, c\+\+ or clang"):
        check_config(compose_config(["hardware.compile=true"]))

"""Speed levers (hardware.compile, hardware.attention, hardware.kernels): each computes what the plain run computes, and the
record says which was used. How much faster they are is a benchmark's question (docs/benchmarks.md)."""

import importlib.metadata
import importlib.util
import sys

import pytest
import torch
from conftest import loss_and_grads

from transfer.config.checks import check_config
from transfer.config.compose import compose_config
from transfer.data.sequences import IGNORE
from transfer.errors import TransferError
from transfer.models.load import load_model_and_tokenizer
from transfer.strategies import apply_strategy
from transfer.training import speed
from transfer.training.hardware import Hardware
from transfer.training.loss import LossOptions
from transfer.training.speed import apply_transforms

RUN = ["strategy=lora", "strategy.dropout=0", "block_size=64", "max_steps=4", "eval_interval=2",
       "eval.max_tokens=1024", "eval.max_new_tokens=3", "optimizer.warmup_ratio=0", "checkpoint.enabled=false",
       "hardware=cpu", "hardware.estimate_memory=false"]  # fmt: skip
needs_liger = pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is None, reason="liger-kernel not installed")


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


def test_a_sweeps_next_job_compiles_afresh_and_the_record_says_when_compile_gave_up(tmp_path, monkeypatch):
    from torch._dynamo.utils import counters

    from transfer.run import run_experiment

    cfg = compose_config([*RUN, "hardware.compile=true", "max_steps=2", "eval_interval=0"])
    first = run_experiment(cfg, tmp_path / "first", {})  # a sweep's first job, in the same process as the next
    assert "gave_up" not in first["transforms"]["compiled"]
    # the next job may compile a block's code once only (a limit of 1): evaluation's version is one too many
    monkeypatch.setattr(speed, "RECOMPILE_LIMIT", 1)
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", torch._dynamo.config.recompile_limit)
    before = counters["stats"]["unique_graphs"]
    second = run_experiment(cfg, tmp_path / "second", {})
    assert counters["stats"]["unique_graphs"] > before  # compiled again, not left with the first job's versions
    (line,) = second["transforms"]["compiled"]["gave_up"]  # torch's own words, on one line: not checked here
    assert line and "\n" not in line
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


def test_liger_without_a_gpu_is_one_line():
    with pytest.raises(TransferError) as e:
        check_config(compose_config(["hardware=cpu", "hardware.kernels=liger"]))
    assert str(e.value) == "hardware.kernels=liger runs Triton kernels on a CUDA GPU, not hardware.device=cpu; " \
        "allowed there: torch"  # fmt: skip
    if torch.cuda.is_available():
        return
    with pytest.raises(TransferError) as e:  # hardware=auto, on this machine
        check_config(compose_config(["hardware.kernels=liger"]))
    if not all(importlib.util.find_spec(name) for name in ("liger_kernel", "triton")):
        assert str(e.value).startswith(
            "hardware.kernels=liger needs the liger-kernel package (and triton), which is not"
        )
    else:
        assert str(e.value) == "hardware.kernels=liger needs a CUDA GPU and there is none here; allowed: torch"


@needs_liger
def test_liger_patches_its_model_alone_and_the_next_job_gets_transformers_own_code():
    from transformers import Qwen2ForCausalLM

    from transfer.job import JobContext

    modeling = sys.modules[Qwen2ForCausalLM.__module__]
    names = ("apply_rotary_pos_emb", "Qwen2RMSNorm", "Qwen2MLP")
    own = {name: getattr(modeling, name) for name in names}
    cfg = compose_config(["strategy=lora", "hardware.kernels=liger"])
    model, _ = load_model_and_tokenizer(cfg.model, 64)
    model, _ = apply_strategy(model, cfg.strategy, seed=0)
    described = {"name": "liger", "version": importlib.metadata.version("liger-kernel"), "model_type": "qwen2",
                 "loss": "Liger's fused linear cross-entropy, where the logits are the head's output"}  # fmt: skip
    assert apply_transforms(model, cfg, estimate=True)["kernels"] == described  # the estimate's: checked, not patched
    assert not any("forward" in vars(m) for m in model.modules())
    with JobContext():  # a job: its end puts back what Liger patched
        done = apply_transforms(model, cfg)["kernels"]
        # each of the 4 blocks' MLP and two norms, and the final norm; the rotary embedding is a function of the module
        assert done == {**described, "modules": 4 * 3 + 1, "functions": ["apply_rotary_pos_emb"]}
        # the training loss is Liger's where the run's hardware says so (hardware.kernels is what LossOptions reads)
        assert LossOptions.of(Hardware(torch.device("cpu"), "fp32", 4096, "liger")) == LossOptions(4096, liger=True)
        # a model built after it (a sweep's next job, in the same process) is transformers' own
        assert modeling.Qwen2RMSNorm is own["Qwen2RMSNorm"] and modeling.Qwen2MLP is own["Qwen2MLP"]
        assert modeling.apply_rotary_pos_emb is not own["apply_rotary_pos_emb"]  # called at every step of this job
    plain = compose_config(["strategy=lora"])
    later, _ = load_model_and_tokenizer(plain.model, 64)
    assert apply_transforms(later, plain)["kernels"] == "torch"
    assert {name: getattr(modeling, name) for name in names} == own
    assert not any("forward" in vars(m) for m in later.modules())
    assert LossOptions.of(Hardware(torch.device("cpu"), "fp32", 4096, "torch")) == LossOptions(4096, liger=False)


@needs_liger
def test_liger_refuses_a_model_it_has_no_kernels_for_in_one_line():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32))
    with pytest.raises(TransferError) as e:  # in the memory estimate: before the run reads a weight
        apply_transforms(model, compose_config(["hardware.kernels=liger"]), estimate=True)
    assert str(e.value) == "hardware.kernels=liger: liger-kernel has no kernels for GPT2LMHeadModel (model type " \
        "'gpt2'); allowed for it: torch"  # fmt: skip


@needs_liger
@pytest.mark.parametrize(
    "overrides, loss_used",
    [
        (["objective=dpo", "dataset=hh_rlhf_harmless"], "dpo's own, from sequence log-probabilities"),
        (["strategy.modules_to_save=[head]"],
         "ours: Liger's fused loss takes a bias-free torch.nn.Linear head, not ModulesToSaveWrapper"),
    ],
)  # fmt: skip
def test_the_record_says_which_loss_liger_leaves_to_whom(overrides, loss_used):
    cfg = compose_config(["strategy=lora", "hardware.kernels=liger", *overrides])
    model, _ = load_model_and_tokenizer(cfg.model, 64)
    model, _ = apply_strategy(model, cfg.strategy, seed=0)
    assert apply_transforms(model, cfg, estimate=True)["kernels"]["loss"] == loss_used


class _OwnQwen2(__import__("transformers").Qwen2ForCausalLM):
    """A model class of its own module, as trust_remote_code loads one."""


@needs_liger
def test_liger_refuses_what_its_kernels_would_not_patch_or_would_change_in_one_line(monkeypatch):
    from transformers import Qwen2Config

    cfg = compose_config(["hardware.kernels=liger"])
    tiny = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=64)
    with pytest.raises(TransferError) as e:
        apply_transforms(_OwnQwen2(Qwen2Config(**tiny)), cfg, estimate=True)
    assert str(e.value) == f"hardware.kernels=liger: _OwnQwen2 is the model's own code ({__name__}, " \
        "trust_remote_code), which Liger's kernels do not patch; allowed for it: torch"  # fmt: skip
    from transformers import Qwen2ForCausalLM

    with pytest.raises(TransferError) as e:
        apply_transforms(Qwen2ForCausalLM(Qwen2Config(**tiny, hidden_act="gelu")), cfg, estimate=True)
    assert str(e.value) == "hardware.kernels=liger: Qwen2ForCausalLM's MLP activation is 'gelu', and Liger's " \
        "SwiGLU kernel computes silu; allowed for it: torch"  # fmt: skip
    # nor may an out-of-memory move the job to the CPU, where the kernels cannot run
    monkeypatch.setattr("transfer.config.preflight.cuda_available", lambda: True)
    with pytest.raises(TransferError) as e:
        check_config(compose_config(["hardware.kernels=liger", "hardware.on_oom=cpu"]))
    assert str(e.value) == "hardware.on_oom=cpu would go on on the CPU, where hardware.kernels=liger cannot run; " \
        "allowed with it: fail, halve"  # fmt: skip


@needs_liger
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU's check, in Triton's interpreter; test_cuda runs it")
@pytest.mark.parametrize("scored", ["every-token", "answers-only"])
def test_ligers_fused_loss_computes_ours(scored):
    """Liger's fused linear cross-entropy, as training's loss, equals ours: the same sum, count and gradients,
    with prompt positions (IGNORE) left out. On a CPU its Triton kernels run in Triton's interpreter (conftest)."""
    cfg = compose_config(["strategy=full"])
    model, _ = load_model_and_tokenizer(cfg.model, 64)
    ids = torch.randint(0, 257, (2, 48), generator=torch.Generator().manual_seed(0))
    labels = ids if scored == "every-token" else ids.clone().index_fill_(1, torch.arange(10), IGNORE)
    ours = loss_and_grads(model, ids, labels, 4096)
    import liger_kernel.transformers as liger

    calls = []
    with pytest.MonkeyPatch.context() as patch:  # it is Liger's that runs
        forward = liger.LigerFusedLinearCrossEntropyLoss.forward
        patch.setattr(liger.LigerFusedLinearCrossEntropyLoss, "forward",
                      lambda self, *a: calls.append(a) or forward(self, *a))  # fmt: skip
        theirs = loss_and_grads(model, ids, labels, 4096, liger=True)
    assert len(calls) == 1
    assert theirs[1] == ours[1] == (94 if scored == "every-token" else 76)
    torch.testing.assert_close(theirs[0], ours[0], rtol=1e-6, atol=0)
    for name, grad in ours[2].items():
        assert torch.linalg.norm(theirs[2][name] - grad) <= 1e-5 * torch.linalg.norm(grad), name


def test_compile_without_a_cxx_compiler_is_one_line(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(TransferError, match=r"^hardware.compile=true needs a C\+\+ compiler \(g\+\+, c\+\+ or clang"):
        check_config(compose_config(["hardware.compile=true"]))

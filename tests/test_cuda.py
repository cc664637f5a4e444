"""What only a CUDA GPU can show: half-precision training, QLoRA, CUDA peak memory, running out of it.

Skipped where there is no CUDA device (CI has none). On a GPU machine they run with the
rest of `make test`, or alone: `python -m pytest -q tests/test_cuda.py`.
"""

import pytest
import torch
from conftest import FAST, loss_and_grads, run_cli, run_ok

from transfer.record import read_record

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

ON_CUDA = [*FAST, "hardware.device=cuda"]


def perplexities(record: dict) -> tuple[float, float]:
    """Validation perplexity before and after training."""
    return (
        record["eval"]["baseline"]["validation"]["perplexity"],
        record["eval"]["final"]["validation"]["perplexity"],
    )


@pytest.mark.parametrize("chunks", [0, 128], ids=["whole-logits", "loss-chunks"])
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_training_learns_and_records_cuda_memory(tmp_path, precision, chunks):
    run_ok([*ON_CUDA, f"hardware.precision={precision}", f"hardware.loss_chunk_tokens={chunks}",
            "hydra.run.dir=run"], tmp_path)  # fmt: skip
    record = read_record(tmp_path / "run")
    assert record["hardware"]["device"].startswith("cuda") and record["hardware"]["precision"] == precision
    before, after = perplexities(record)
    assert after < 0.5 * before  # FAST on CPU in fp32 goes from about 300 to under 40
    assert record["memory"]["kind"] == "cuda_max_memory_allocated"
    # the tiny model's weights, gradients and AdamW state alone are 4 x 0.8 M float32 values
    assert record["memory"]["bytes"] > 4 * 4 * record["params"]["total"]


@pytest.mark.parametrize("precision", [torch.bfloat16, torch.float16])
def test_the_fused_loss_runs_on_cuda_and_matches_the_whole_logits(precision):
    """The default loss (fused, in chunks) must be found usable on a GPU, not silently switched off."""
    from transfer.config.compose import compose_config
    from transfer.models.load import load_model_and_tokenizer
    from transfer.training.loss import _HEAD_IS_LAST

    model, _ = load_model_and_tokenizer(compose_config([]).model, 64)
    model.cuda()
    ids = torch.randint(0, model.config.vocab_size, (4, 64), device="cuda")

    whole, _, grads_whole = loss_and_grads(model, ids, ids, 0, scale=1 / 256, autocast=precision)
    chunked, _, grads_chunked = loss_and_grads(model, ids, ids, 100, scale=1 / 256, autocast=precision)
    assert _HEAD_IS_LAST[model] is True
    torch.testing.assert_close(chunked, whole, rtol=1e-4, atol=0)
    for name in grads_whole:  # half-precision products: agree to their rounding, relative to the largest
        scale = grads_whole[name].abs().max()
        torch.testing.assert_close(grads_chunked[name] / scale, grads_whole[name] / scale, rtol=0, atol=2e-2, msg=name)


def test_qlora_trains_4bit_weights_and_counts_them_as_parameters(shared, tmp_path):
    from transfer.config.compose import compose_config
    from transfer.models.anatomy import numel
    from transfer.models.load import load_model_and_tokenizer

    model = [f"model.name_or_path={shared / 'models' / 'stories260k-qwen2'}", "model.tokenizer_from_json=true"]
    cfg = compose_config([*model, "strategy=qlora"])
    quantized, _ = load_model_and_tokenizer(cfg.model, 64, quantize_4bit=True)
    weight = quantized.model.layers[0].self_attn.q_proj.weight  # 64 x 64 in stories260k
    assert type(weight).__name__ == "Params4bit"
    assert numel(weight) == 64 * 64 == 2 * weight.numel()  # two 4-bit values per stored byte
    del quantized, weight

    run_ok(["-m", *ON_CUDA, *model, "hardware.precision=bf16", "strategy=lora,qlora", "strategy.r=8",
            "optimizer.lr=1e-3", "hydra.sweep.dir=sweep"], tmp_path)  # fmt: skip
    lora, qlora = (read_record(tmp_path / "sweep" / job) for job in ("0", "1"))
    assert qlora["model"]["weights"] == "4-bit NF4" and lora["model"]["weights"] != "4-bit NF4"
    # the same model and adapters: 4-bit weights are as many parameters as full-precision ones
    for key in ("total", "trainable", "breakdown", "tied_embeddings", "peft_target_modules"):
        assert qlora["params"][key] == lora["params"][key], key
    assert qlora["params"]["trainable"] == qlora["params"]["breakdown"]["peft"] > 0
    before, after = perplexities(qlora)
    assert after < before
    assert qlora["train"]["loss_last"] < qlora["train"]["loss_first"]


def test_running_out_of_cuda_memory_is_one_line_and_the_next_job_gets_the_memory(tmp_path):
    # 2,000,000 blocks of 64 tokens in one micro-batch: the embeddings' output alone is 61 GiB of float32. The estimate
    # would refuse it before training (transfer/memory.py): off, for the device's own error
    proc = run_cli(["-m", *ON_CUDA, "hardware.on_oom=fail", "hardware.estimate_memory=false",
                    "micro_batch_size=2000000,8", "hydra.sweep.dir=sweep"], tmp_path, timeout=600)  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-3000:]
    failed, completed = (read_record(tmp_path / "sweep" / job) for job in ("0", "1"))
    assert failed["status"] == "failed" and completed["status"] == "completed", failed.get("error")
    assert failed["error"].startswith("out of memory on cuda training at micro_batch_size=2000000, block_size=64")
    assert "to fit: micro_batch_size=1000000 grad_accum_steps=2 (the same batch per step)" in failed["error"]
    # the job's error is logged (to stdout, through Hydra's logging) as one line, with no traceback
    output = proc.stdout + proc.stderr
    assert len([line for line in output.splitlines() if "error: out of memory" in line]) == 1, output[-3000:]
    assert "Traceback" not in output
    # the failed job's tensors were freed: the next job's peak is its own, far below the failed one's
    assert completed["memory"]["bytes"] < 2**30


def test_the_fused_loss_skips_masked_positions_on_cuda_and_matches_the_whole_logits():
    """sft's path: only scored positions meet the head, in bf16 on a GPU."""
    from transfer.config.compose import compose_config
    from transfer.models.load import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(compose_config([]).model, 64)
    model.cuda()
    ids = torch.randint(0, model.config.vocab_size, (4, 64), device="cuda")
    labels = ids.clone()
    labels[:, :40] = -100  # a prompt: not scored
    whole, n, grads_whole = loss_and_grads(model, ids, labels, 0, scale=1 / 96, autocast=torch.bfloat16)
    chunked, m, grads_chunked = loss_and_grads(model, ids, labels, 100, scale=1 / 96, autocast=torch.bfloat16)
    assert n == m == 4 * 24
    torch.testing.assert_close(chunked, whole, rtol=1e-4, atol=0)
    for name in grads_whole:
        scale = grads_whole[name].abs().max()
        torch.testing.assert_close(grads_chunked[name] / scale, grads_whole[name] / scale, rtol=0, atol=2e-2, msg=name)


def test_sft_with_choices_trains_on_cuda_in_bf16(tmp_path):
    from test_objectives import parity_task

    run_ok([*parity_task(tmp_path), "hardware.device=cuda", "hardware.precision=bf16", "checkpoint.enabled=false",
            "hydra.run.dir=run"], tmp_path)  # fmt: skip
    record = read_record(tmp_path / "run")
    assert record["hardware"]["device"].startswith("cuda") and record["objective"]["name"] == "sft"
    before, after = record["eval"]["baseline"]["validation"], record["eval"]["final"]["validation"]
    assert after["loss"] < before["loss"]
    assert 0 <= after["auc"] <= 1 and after["choice_examples"] == 40


def test_the_command_line_finds_the_gpu_without_torch():
    from transfer.config.preflight import cuda_available

    assert cuda_available() is True


@pytest.mark.parametrize("objective", ["dpo", "kto"])
def test_preference_objectives_train_on_cuda_in_bf16_with_lora(tmp_path, objective):
    """The reference is the base with adapters disabled, on the GPU; the preferred answer wins more often."""
    from test_preference import preference_task

    run_ok([*preference_task(tmp_path), f"objective={objective}", "strategy=lora", "micro_batch_size=8", "max_steps=30",
            "eval_interval=0", "optimizer.lr=1e-3", "hardware.device=cuda", "hardware.precision=bf16",
            "checkpoint.enabled=false", "hydra.run.dir=run"], tmp_path)  # fmt: skip
    record = read_record(tmp_path / "run")
    assert record["objective"]["reference"] == "adapters disabled" and record["hardware"]["device"].startswith("cuda")
    before, after = record["eval"]["baseline"]["validation"], record["eval"]["final"]["validation"]
    assert before["reward_accuracy"] == 0.5 and after["reward_accuracy"] > 0.5 and after["token_kl"] > 0


@pytest.mark.parametrize("policy", ["halve", "cpu"])
def test_real_out_of_memory_is_survived_by_halving_or_moving_to_the_cpu(policy):
    """The GPU capped at 256 MiB: 64 x 512 tokens do not fit; halving finds what does, or the CPU takes over."""
    from transfer.config.compose import compose_config
    from transfer.models.load import load_model_and_tokenizer
    from transfer.objectives import build_objective
    from transfer.train import train
    from transfer.training.hardware import resolve
    from transfer.training.oom import MemoryPlan

    cfg = compose_config(["hardware.device=cuda", "hardware.precision=bf16", "micro_batch_size=64", "block_size=512",
                          "max_steps=2", "eval_interval=0", f"hardware.on_oom={policy}", "optimizer.warmup_ratio=0"])  # fmt: skip
    model, tokenizer = load_model_and_tokenizer(cfg.model, cfg.block_size)
    objective = build_objective(cfg, tokenizer)
    splits = objective.prepare(4096)
    hardware = resolve(cfg.hardware)
    model.to(hardware.device)
    plan = MemoryPlan(cfg, hardware)
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(256 * 2**20 / torch.cuda.get_device_properties(0).total_memory)
    try:
        result = train(model, objective, splits, cfg, hardware, plan=plan)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    assert result["steps"] == 2 and result["samples"] == 2 * 64 and plan.events
    if policy == "halve":
        assert plan.micro * plan.accum == 64 and plan.micro < 64 and hardware.device.type == "cuda"
    else:
        assert hardware.device.type == "cpu" and next(model.parameters()).device.type == "cpu"
        assert plan.events[0]["change"] == "moved from cuda (bf16) to cpu (fp32)"


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_blocks_on_cuda_learn_as_plain_ones_and_compile_all_through(tmp_path, mode):
    """hardware.compile on a GPU in bf16 (Triton kernels; reduce-overhead adds CUDA graphs): the same learning."""
    from transfer.config.compose import compose_config
    from transfer.run import run_experiment

    run = [*ON_CUDA, "hardware.precision=bf16", "checkpoint.enabled=false"]
    plain = run_experiment(compose_config(run), tmp_path / "plain", {})
    compiled = run_experiment(compose_config([*run, "hardware.compile=true", f"hardware.compile_mode={mode}"]),
                              tmp_path / "compiled", {})  # fmt: skip
    assert compiled["transforms"]["compiled"] == {"what": "each decoder block", "blocks": 4, "mode": mode}
    before, after = perplexities(compiled)
    assert after == pytest.approx(perplexities(plain)[1], rel=0.02) and after < 0.5 * before


liger = pytest.mark.skipif(__import__("importlib").util.find_spec("liger_kernel") is None, reason="needs liger-kernel")


@liger
def test_liger_kernels_on_cuda_learn_as_ours_and_the_next_job_runs_transformers_own(tmp_path):
    """hardware.kernels=liger in bf16: Liger's norms, MLPs, RoPE and fused loss learn as PyTorch's and ours do, and a
    later job of the same process (a sweep's) runs transformers' own functions again."""
    import sys

    from transformers import Qwen2ForCausalLM

    from transfer.config.compose import compose_config
    from transfer.run import run_experiment

    modeling = sys.modules[Qwen2ForCausalLM.__module__]
    rope = modeling.apply_rotary_pos_emb
    run = [*ON_CUDA, "hardware.precision=bf16", "checkpoint.enabled=false"]
    fast = run_experiment(compose_config([*run, "hardware.kernels=liger"]), tmp_path / "liger", {})
    assert fast["transforms"]["kernels"]["modules"] == 13 and modeling.apply_rotary_pos_emb is not rope
    plain = run_experiment(compose_config(run), tmp_path / "plain", {})
    assert plain["transforms"]["kernels"] == "torch" and modeling.apply_rotary_pos_emb is rope
    before, after = perplexities(fast)
    assert after == pytest.approx(perplexities(plain)[1], rel=0.02) and after < 0.5 * before


@liger
def test_ligers_fused_loss_on_cuda_matches_ours_in_bf16():
    from transfer.config.compose import compose_config
    from transfer.models.load import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(compose_config(["strategy=full"]).model, 128)
    model.cuda()
    ids = torch.randint(0, 257, (4, 128), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    ours = loss_and_grads(model, ids, ids, 4096, autocast=torch.bfloat16)
    theirs = loss_and_grads(model, ids, ids, 4096, autocast=torch.bfloat16, liger=True)
    assert theirs[1] == ours[1] == 4 * 127
    torch.testing.assert_close(theirs[0], ours[0], rtol=2e-3, atol=0)
    for name, grad in ours[2].items():
        assert torch.linalg.norm(theirs[2][name] - grad) <= 3e-2 * torch.linalg.norm(grad), name

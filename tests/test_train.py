"""The pieces of the training loop: step plan, data order, schedule, loss weighting."""

import math

import pytest
import torch
from conftest import loss_and_grads

from transfer.config.compose import compose_config
from transfer.config.optimizer import learning_rate
from transfer.data.blocks import to_blocks
from transfer.data.sequences import ExampleStream
from transfer.evaluation.perplexity import perplexity
from transfer.models.load import load_model_and_tokenizer
from transfer.objectives import build_objective
from transfer.training.hardware import resolve
from transfer.training.loss import _HEAD_IS_LAST
from transfer.training.optim import build_optimizer, build_scheduler
from transfer.training.progress import plan_steps


def test_plan_steps_takes_the_first_bound_reached():
    per_epoch = 80 / (4 * 2)  # 80 examples, 4 x 2 a step
    cfg = compose_config(["max_steps=100", "epochs=null"])
    assert plan_steps(cfg, per_epoch) == (100, "max_steps")
    cfg = compose_config(["max_steps=null", "epochs=2"])
    assert plan_steps(cfg, per_epoch) == (20, "epochs")
    cfg = compose_config(["max_steps=15", "epochs=2"])
    assert plan_steps(cfg, per_epoch) == (15, "max_steps")
    assert plan_steps(compose_config(["max_steps=null", "epochs=0.5"]), 9.5) == (5, "epochs")  # a part step counts


def test_the_pace_leaves_out_the_first_step_and_looks_at_the_last_few():
    from transfer.training.progress import Pace

    pace = Pace(window=3)
    assert pace.tokens_per_second(5.0, 800) is None  # nothing to measure from yet
    pace.mark(5.0, 800, 1)  # the end of a slow first step: 5 s for 800 tokens
    assert pace.tokens_per_second(6.0, 1600) == pytest.approx(800 / 1.0)  # 800 tok/s, not 1,600 / 6
    for t, n, step in ((6.0, 1600, 2), (7.0, 2400, 3), (8.0, 3200, 4)):
        pace.mark(t, n, step)
    assert pace.tokens_per_second(8.5, 4000) == pytest.approx(2400 / 2.5)  # from the oldest of the last 3 marks
    assert pace.seconds_left(8.0, 4, last_step=10) == pytest.approx(6 * 2.0 / 2)  # 1 s a step lately, 6 to go


def test_each_epoch_is_one_pass_in_a_seeded_order_that_restarts_anywhere():
    stream = ExampleStream(torch.ones(10), seed=3)
    first, second = [stream.next() for _ in range(10)], [stream.next() for _ in range(10)]
    assert sorted(first) == sorted(second) == list(range(10))
    assert first != second
    assert [ExampleStream(torch.ones(10), seed=3, start=7).next() for _ in range(1)] == [first[7]]
    again = ExampleStream(torch.ones(10), seed=3, start=13)
    assert [again.next() for _ in range(7)] == second[3:]


def test_length_grouping_keeps_each_epoch_a_permutation_and_batches_alike():
    lengths = torch.randint(1, 200, (256,), generator=torch.Generator().manual_seed(0))
    stream = ExampleStream(lengths, seed=1, group=32)
    order = [stream.next() for _ in range(256)]
    assert sorted(order) == list(range(256))
    runs = [lengths[order[i : i + 32]] for i in range(0, 256, 32)]
    assert all(run.tolist() == sorted(run.tolist(), reverse=True) for run in runs)  # longest first within a run
    ungrouped = ExampleStream(lengths, seed=1)
    plain = [ungrouped.next() for _ in range(256)]
    assert sorted(plain[:32]) == sorted(order[:32])  # the same examples, reordered within the run


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_schedule_warms_up_then_follows_its_shape(schedule):
    cfg = compose_config([f"optimizer.schedule={schedule}", "optimizer.warmup_ratio=0", "optimizer.warmup_steps=10",
                          "optimizer.min_lr_ratio=0.1", "optimizer.lr=1.0"])  # fmt: skip
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, cfg.optimizer, total_steps=110)
    lrs = []
    for _ in range(110):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[:10] == sorted(lrs[:10]) and lrs[0] < 0.2 and lrs[10] == pytest.approx(1.0)
    final = {"cosine": 0.1, "linear": 0.0, "constant": 1.0}[schedule]
    assert lrs[-1] == pytest.approx(final, abs=0.02)
    if schedule == "cosine":
        assert lrs[60] == pytest.approx(0.1 + 0.9 * 0.5, abs=0.01)  # halfway down


def test_no_weight_decay_on_biases_and_norms():
    cfg = compose_config(["optimizer.weight_decay=0.1"])
    model, _ = load_model_and_tokenizer(cfg.model, 64)
    opt = build_optimizer(model, cfg.optimizer, torch.device("cpu"), learning_rate(cfg)[0])
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in decayed) == (p.ndim >= 2), name


@pytest.mark.parametrize("fused", [True, False])
def test_adamw_uses_the_fused_kernel_on_cpu_unless_told_not_to(fused):
    cfg = compose_config([f"optimizer.fused={fused}"])
    model, _ = load_model_and_tokenizer(cfg.model, 64)
    opt = build_optimizer(model, cfg.optimizer, torch.device("cpu"), learning_rate(cfg)[0])
    assert bool(opt.defaults["fused"]) is fused


def test_perplexity_is_token_weighted_over_the_whole_split():
    cfg = compose_config([])
    model, _ = load_model_and_tokenizer(cfg.model, 16)
    ids = list(torch.randint(0, 257, (50,), generator=torch.Generator().manual_seed(0)).tolist())
    blocks = to_blocks(ids, 16, keep_partial=True)  # 3 full blocks + 2 tokens
    hw = resolve(cfg.hardware)
    got = perplexity(model, blocks, 2, hw, pad_id=0)
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, 50, 16):
            chunk = torch.tensor([ids[start : start + 16]])
            out = model(input_ids=chunk, labels=chunk)
            n = chunk.shape[1] - 1
            total += out.loss.item() * n
            count += n
    assert got["tokens"] == count == 15 * 3 + 1
    assert got["loss"] == pytest.approx(total / count, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)
    assert perplexity(model, blocks, 4, hw, pad_id=0)["loss"] == pytest.approx(got["loss"], rel=1e-6)


@pytest.mark.parametrize(
    "overrides",
    [
        ["strategy=full"],  # the head trains: fused gradients for the weight and the hidden states
        ["strategy=adapter"],  # the tied head is frozen: fused gradients for the hidden states only
        ["strategy=lora", "strategy.dropout=0"],
        ["strategy=lora", "strategy.dropout=0", "strategy.modules_to_save=[head]"],  # a peft-wrapped head: recomputed
    ],
    ids=["full", "adapter", "lora", "lora-head"],
)
def test_chunked_loss_equals_the_loss_over_the_full_logits(overrides):
    from transfer.models.anatomy import base_model
    from transfer.strategies import apply_strategy
    from transfer.training.loss import summed_lm_loss

    cfg = compose_config(["model=tiny_random", *overrides])  # the random model: gradients of one scale throughout
    model, _ = load_model_and_tokenizer(cfg.model, 64)
    model, _ = apply_strategy(model, cfg.strategy, seed=0)
    ids = torch.randint(0, model.config.vocab_size, (3, 64), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :5] = -100  # unscored positions must stay unscored in every chunk

    whole, n_whole, grads_whole = loss_and_grads(model, ids, labels, 0, scale=0.5)
    for chunk in (50, 4096):  # 192 positions: 4 chunks, the last one short; then all in one
        chunked, n_chunked, grads_chunked = loss_and_grads(model, ids, labels, chunk, scale=0.5)
        assert n_whole == n_chunked == 3 * (63 - 4)  # labels[:, 1:5] unscored
        # the same sums in another order: float32 rounding only
        torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=0)
        assert grads_whole.keys() == grads_chunked.keys() and grads_whole
        for name in grads_whole:
            torch.testing.assert_close(grads_chunked[name], grads_whole[name], rtol=1e-4, atol=1e-6, msg=name)
    with torch.no_grad():  # evaluation takes the chunked path without gradients
        torch.testing.assert_close(summed_lm_loss(model, ids, labels, chunk_tokens=50)[0], whole, rtol=1e-5, atol=0)
    base = base_model(model)
    assert _HEAD_IS_LAST[base] is True  # the chunked path did run: the model was found to allow it


def test_chunked_loss_under_bf16_autocast_matches_the_unchunked_one():
    """The fused head multiplies in autocast's dtype, as the head's own forward does, and sums in float32."""
    model, _ = load_model_and_tokenizer(compose_config([]).model, 64)
    ids = torch.randint(0, model.config.vocab_size, (3, 64), generator=torch.Generator().manual_seed(0))

    whole, _, grads_whole = loss_and_grads(model, ids, ids, 0, scale=0.01, autocast=torch.bfloat16)
    chunked, _, grads_chunked = loss_and_grads(model, ids, ids, 50, scale=0.01, autocast=torch.bfloat16)
    assert chunked.dtype == whole.dtype == torch.float32 and _HEAD_IS_LAST[model] is True
    # the same bf16 products summed in another order (1e-7 apart here); float32 products would be 2e-5 away
    torch.testing.assert_close(chunked, whole, rtol=5e-6, atol=0)
    assert grads_chunked["model.embed_tokens.weight"].dtype == torch.float32  # the tied head's, as its weight
    for name in grads_whole:  # bf16 keeps 8 bits of mantissa: agree to its rounding, relative to the largest
        scale = grads_whole[name].abs().max()
        torch.testing.assert_close(grads_chunked[name] / scale, grads_whole[name] / scale, rtol=0, atol=2e-2, msg=name)


@pytest.mark.parametrize(
    "model_type, scaling",
    [
        ("falcon_h1", dict(lm_head_multiplier=0.05, mamba_d_ssm=64, mamba_n_heads=4, mamba_d_head=16,
                           mamba_n_groups=1, mamba_d_state=16)),
        ("recurrent_gemma", dict(logits_soft_cap=3.0, lru_width=64, attention_window_size=16, num_hidden_layers=3)),
        ("granite", dict(logits_scaling=8.0)),
        # a cap that is nearly the identity on a new model's small logits is a cap all the same
        ("gemma2", dict(final_logit_softcapping=30.0, initializer_range=0.002, head_dim=16)),
    ],
)  # fmt: skip
def test_chunked_loss_keeps_logits_that_forward_scales_after_the_head(model_type, scaling):
    """Each architecture names its scaling differently; the model is asked, not its config keys."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from transfer.training.loss import summed_lm_loss

    config = AutoConfig.for_model(
        model_type, **{"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 1,
        "intermediate_size": 128, "vocab_size": 300, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2, **scaling},
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    ids = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(0))

    whole, _, grads_whole = loss_and_grads(model, ids, ids, 0)
    chunked, _, grads_chunked = loss_and_grads(model, ids, ids, 16)
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=0)
    for name in grads_whole:
        torch.testing.assert_close(grads_chunked[name], grads_whole[name], rtol=1e-4, atol=1e-6, msg=name)
    with torch.no_grad():  # evaluation in chunks too
        torch.testing.assert_close(summed_lm_loss(model, ids, ids, chunk_tokens=16)[0], whole, rtol=1e-5, atol=0)
    assert _HEAD_IS_LAST[model] is False


def test_a_decoder_that_cannot_run_alone_keeps_the_whole_logits_and_the_training_mode(monkeypatch):
    from transfer.training.loss import summed_lm_loss

    model, _ = load_model_and_tokenizer(compose_config([]).model, 64)
    ids = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    whole, _ = summed_lm_loss(model, ids, ids, chunk_tokens=0)

    def no_decoder():
        raise RuntimeError("this decoder needs its wrapper")

    monkeypatch.setattr(model, "get_decoder", no_decoder)
    model.train()
    chunked, _ = summed_lm_loss(model, ids, ids, chunk_tokens=16)
    assert model.training and _HEAD_IS_LAST[model] is False
    torch.testing.assert_close(chunked, whole, rtol=0, atol=0)  # autograd's path: the very same sum


def test_fused_head_gradient_does_not_overflow_in_fp16():
    """A frequent token's gradient row sums over the chunk before the loss scale applies: past 65,504."""
    from transfer.training.loss import _FusedHeadLoss

    hidden = torch.randn(4096, 8, generator=torch.Generator().manual_seed(0))
    hidden[:, 0] = 20.0  # one large hidden dimension, as trained models have
    weight = torch.randn(16, 8, generator=torch.Generator().manual_seed(1)) * 0.02
    targets = torch.full((4096,), 3)  # the same token everywhere

    def head_gradient(autocast):
        w = weight.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.float16, enabled=autocast):
            loss = _FusedHeadLoss.apply(hidden.clone().requires_grad_(), w, targets, 4096)
        (loss / 4096).backward()
        return w.grad

    reference, fp16 = head_gradient(False), head_gradient(True)
    assert reference[3, 0] < -18  # the mean over tokens: the chunk's sum was about 4,096 x -18 = -75,000
    assert fp16.isfinite().all()
    torch.testing.assert_close(fp16, reference, rtol=1e-2, atol=1e-3)


def test_running_out_of_memory_is_one_line_that_says_what_fits(monkeypatch):
    import transfer.evaluation.perplexity
    import transfer.objectives.base
    import transfer.training.step
    from transfer.errors import TransferError
    from transfer.train import train

    def no_memory(*args, **kwargs):  # what the CUDA caching allocator raises
        raise torch.OutOfMemoryError(
            "CUDA out of memory. Tried to allocate 2.25 GiB. GPU 0 has a total capacity of 79.19 GiB of which 1.50 GiB is free."
        )

    cfg = compose_config(
        ["micro_batch_size=8", "grad_accum_steps=2", "block_size=64", "max_steps=2", "eval_interval=0",
         "hardware.on_oom=fail"]
    )  # fmt: skip
    model, tokenizer = load_model_and_tokenizer(cfg.model, 64)
    objective = build_objective(cfg, tokenizer)
    splits = objective.prepare(2048)
    hw = resolve(cfg.hardware)
    monkeypatch.setattr(transfer.objectives.base, "summed_lm_loss", no_memory)
    with pytest.raises(TransferError) as e:
        train(model, objective, splits, cfg, hw)
    assert str(e.value) == (
        "out of memory on cpu training at micro_batch_size=8, block_size=64 (Tried to allocate 2.25 GiB); "
        "to fit: micro_batch_size=4 grad_accum_steps=4 (the same batch per step), "
        "a strategy that trains less (adapter, lora), hardware.precision=bf16"
    )  # 8 x 64 tokens: smaller loss chunks would change nothing
    assert transfer.training.step.memory_fixes(16, 1, 1024, hw)[1] == "hardware.loss_chunk_tokens=1024"  # 16,384 tokens
    assert e.value.__context__ is None or e.value.__suppress_context__  # reported alone, not as a chain
    monkeypatch.setattr(transfer.evaluation.perplexity, "summed_lm_loss", no_memory)
    with pytest.raises(TransferError) as e:
        objective.evaluate(model, splits["validation"], 16, hw, "baseline validation")
    assert str(e.value) == (
        "out of memory on cpu evaluating (baseline validation) at eval_batch_size=16 (Tried to allocate 2.25 GiB); "
        "to fit: eval_batch_size=8, hardware.precision=bf16"
    )
    # at eval_batch_size=1 only smaller chunks are left, where the chunks are not small already
    with pytest.raises(TransferError) as e:
        objective.evaluate(model, splits["validation"], 1, hw, "validate")
    assert str(e.value).endswith("at eval_batch_size=1 (Tried to allocate 2.25 GiB); to fit: hardware.precision=bf16")
    hw.loss_chunk_tokens = 512
    assert "loss_chunk_tokens" not in " ".join(transfer.training.step.memory_fixes(16, 1, 1024, hw))
    hw.loss_chunk_tokens, hw.kernels = 4096, "liger"  # Liger's loss, which makes its own chunks
    assert "loss_chunk_tokens" not in " ".join(transfer.training.step.memory_fixes(16, 1, 1024, hw))

"""Preference objectives: each loss against its formula (and TRL's where it is importable), the reference
model's three forms, one forward pass for a pair, exact steps, exact resume, two-stage runs."""

import json
import math
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import run_here

from transfer.config.compose import compose_config
from transfer.data.sequences import padded_batch
from transfer.models.load import load_model_and_tokenizer
from transfer.objectives import build_objective
from transfer.objectives.preference_losses import PAIR_LOSSES, Scores, kto
from transfer.strategies import apply_strategy
from transfer.train import train
from transfer.training.hardware import resolve
from transfer.training.loss import LossOptions, sequence_logprobs

# four pairs: policy and reference summed log-probabilities, and the answers' lengths
PC, PR = [-10.0, -12.0, -8.0, -20.0], [-11.0, -11.5, -9.0, -18.0]
RC, RR = [-10.5, -12.0, -8.5, -19.0], [-10.8, -11.0, -9.2, -18.5]
LC, LR = [5, 6, 4, 10], [6, 5, 4, 9]
HP = SimpleNamespace(beta=0.1, label_smoothing=0.2, gamma=0.5, lambda_or=0.3, cpo_alpha=0.7,
                     desirable_weight=1.5, undesirable_weight=0.5)  # fmt: skip


def scores(policy, reference, length) -> Scores:
    as_tensor = lambda v: None if v is None else torch.tensor(v, dtype=torch.float64)  # noqa: E731
    return Scores(as_tensor(policy), as_tensor(reference), as_tensor(length))


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def smoothed(x: float, eps: float) -> float:
    return -(1 - eps) * log_sigmoid(x) - eps * log_sigmoid(-x)


def by_hand(name: str, i: int) -> float:
    """The published formulas, written out for pair i."""
    b, eps = HP.beta, HP.label_smoothing
    pc, pr, rc, rr, lc, lr = PC[i], PR[i], RC[i], RR[i], LC[i], LR[i]
    if name == "dpo":  # Rafailov et al. 2023, eq. 7; conservative DPO's smoothing
        return smoothed(b * ((pc - rc) - (pr - rr)), eps)
    if name == "ipo":  # Azar et al. 2023, eq. 17, log-ratios per answer token
        return ((pc - rc) / lc - (pr - rr) / lr - 1 / (2 * b)) ** 2
    if name == "cpo":  # Xu et al. 2024: the preference term and the chosen answer's likelihood
        return smoothed(b * (pc - pr), eps) + HP.cpo_alpha * (-pc / lc)
    if name == "simpo":  # Meng et al. 2024, eq. 6
        return smoothed(b * (pc / lc - pr / lr) - HP.gamma, eps)
    if name == "orpo":  # Hong et al. 2024, eqs. 6-7, with mean token log-likelihoods
        odds = lambda logp: math.exp(logp) / (1 - math.exp(logp))  # noqa: E731
        return -pc / lc - HP.lambda_or * log_sigmoid(math.log(odds(pc / lc) / odds(pr / lr)))
    raise AssertionError(name)


@pytest.mark.parametrize("name", sorted(PAIR_LOSSES))
def test_each_pair_loss_is_its_published_formula(name):
    losses, chosen, rejected = PAIR_LOSSES[name](scores(PC, RC, LC), scores(PR, RR, LR), HP)
    reward = {  # what each method calls an answer's reward
        "dpo": lambda p, c, n: HP.beta * (p - c), "ipo": lambda p, c, n: HP.beta * (p - c),
        "cpo": lambda p, c, n: HP.beta * p, "simpo": lambda p, c, n: HP.beta * p / n,
        "orpo": lambda p, c, n: HP.lambda_or * p / n,
    }[name]  # fmt: skip
    for i in range(4):
        assert losses[i].item() == pytest.approx(by_hand(name, i), rel=1e-12)
        assert chosen[i].item() == pytest.approx(reward(PC[i], RC[i], LC[i]), rel=1e-12)
        assert rejected[i].item() == pytest.approx(reward(PR[i], RR[i], LR[i]), rel=1e-12)


def test_kto_is_its_published_formula():
    """Ethayarajh et al. 2024, eq. 8, with the KL estimate z given."""
    desirable = torch.tensor([True, False, True, False])
    z = torch.tensor(0.3, dtype=torch.float64)
    losses, rewards = kto(scores(PC, RC, LC), desirable, z, HP)
    sigmoid = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    for i, good in enumerate(desirable.tolist()):
        r = PC[i] - RC[i]
        expected = (HP.desirable_weight * (1 - sigmoid(HP.beta * (r - 0.3))) if good
                    else HP.undesirable_weight * (1 - sigmoid(HP.beta * (0.3 - r))))  # fmt: skip
        assert losses[i].item() == pytest.approx(expected, rel=1e-12)
        assert rewards[i].item() == pytest.approx(HP.beta * r, rel=1e-12)


def test_the_losses_match_trls_own_where_trl_has_them_as_functions():
    """TRL 1.16 computes DPO, IPO and KTO inside its trainers' _compute_loss; CPO, SimPO and ORPO are functions."""
    pytest.importorskip("trl")
    import os

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.orpo import ORPOTrainer

    device = SimpleNamespace(device="cpu")
    pc, pr = torch.tensor(PC, dtype=torch.float64), torch.tensor(PR, dtype=torch.float64)
    ac, ar = pc / torch.tensor(LC), pr / torch.tensor(LR)
    theirs = SimpleNamespace(alpha=0.0, beta=HP.beta, label_smoothing=HP.label_smoothing, accelerator=device,
                             loss_type="sigmoid", simpo_gamma=HP.gamma)  # fmt: skip
    cpo_trl, _, _ = CPOTrainer.cpo_loss(theirs, pc, pr)  # the preference term; the likelihood term is added apart
    ours = PAIR_LOSSES["cpo"](
        scores(PC, None, LC), scores(PR, None, LR), SimpleNamespace(**{**vars(HP), "cpo_alpha": 0})
    )
    torch.testing.assert_close(ours[0], cpo_trl, rtol=1e-6, atol=0)
    theirs.loss_type = "simpo"
    simpo_trl, _, _ = CPOTrainer.cpo_loss(theirs, ac, ar)  # SimPO's log-probabilities are per token
    torch.testing.assert_close(PAIR_LOSSES["simpo"](scores(PC, None, LC), scores(PR, None, LR), HP)[0], simpo_trl,
                               rtol=1e-6, atol=0)  # fmt: skip
    orpo_self = SimpleNamespace(beta=HP.lambda_or, accelerator=device)
    ratio_term, *_ = ORPOTrainer.odds_ratio_loss(orpo_self, ac, ar)  # lambda * log sigmoid(log odds ratio)
    ours = PAIR_LOSSES["orpo"](scores(PC, None, LC), scores(PR, None, LR), HP)[0]
    torch.testing.assert_close(ours, -ac - ratio_term.double(), rtol=1e-6, atol=0)  # ORPO = NLL - that term


# ---------------------------------------------------------------- data and the reference
def preference_task(folder: Path, n: int = 120, held_out: int = 24) -> list[str]:
    """Pairs written for the tests: the chosen answer says yes, the rejected no, to varied questions."""
    rng = random.Random(0)
    for split, size in (("train", n), ("validation", held_out), ("test", held_out)):
        rows = [{"prompt": f"Is {rng.randrange(10, 99)} a number?", "chosen": " Yes.", "rejected": " No."}
                for _ in range(size)]  # fmt: skip
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return ["dataset=text_files", *(f"dataset.{s}_files=[{folder / f'{s}.jsonl'}]" for s in ("train", "validation", "test")),
            "block_size=64", "eval/probes=[]", "eval.max_new_tokens=4", "hardware.estimate_memory=false"]  # fmt: skip


def prepared(folder: Path, *overrides: str):
    cfg = compose_config([*preference_task(folder), *overrides])
    model, tokenizer = load_model_and_tokenizer(cfg.model, cfg.block_size)
    model, _ = apply_strategy(model, cfg.strategy, seed=0)
    objective = build_objective(cfg, tokenizer)
    return cfg, model, objective, objective.prepare(None), resolve(cfg.hardware)


def test_the_reference_of_a_peft_model_is_its_base_with_adapters_disabled(tmp_path):
    cfg, model, objective, splits, hw = prepared(tmp_path, "objective=dpo", "strategy=lora", "strategy.dropout=0")
    base, _ = load_model_and_tokenizer(cfg.model, cfg.block_size)  # the same seeded weights, never wrapped
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)  # B starts at zero: make the adapters change the output
    info = objective.attach(model, splits, cfg, hw)
    assert info == {"reference": "adapters disabled"} and objective.reference.frozen is None  # no second copy
    rows = padded_batch(splits["validation"].seqs, list(range(8)), objective.pad_id)
    with torch.no_grad():
        adapted = sequence_logprobs(model, rows.input_ids, rows.labels)
        plain = sequence_logprobs(base, rows.input_ids, rows.labels)
    model.train()
    reference = objective.reference.live(rows, 0)
    assert model.training  # handed back in the mode it was in
    torch.testing.assert_close(reference, plain, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(adapted, plain, atol=1e-3)


def test_the_reference_of_a_head_trained_as_modules_to_save_is_the_original_head(tmp_path):
    """Evaluation's token KL applies the reference's head after the adapters are on again: it must be the base's."""
    cfg, model, objective, splits, hw = prepared(tmp_path, "objective=dpo", "strategy=lora", "strategy.dropout=0",
                                                 "strategy.modules_to_save=[head]")  # fmt: skip
    base, _ = load_model_and_tokenizer(cfg.model, cfg.block_size)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "modules_to_save" in name:
                p.add_(0.5)  # the trained copy of the head now differs from the original
    objective.attach(model, splits, cfg, hw)
    rows = padded_batch(splits["validation"].seqs, list(range(4)), objective.pad_id)
    with torch.no_grad():
        hidden, head = objective.reference.head_inputs(rows)
        scored = torch.nn.functional.pad(rows.labels[:, 1:], (0, 1), value=-100) != -100
        plain = base(rows.input_ids).logits[scored]
        torch.testing.assert_close(head(hidden), plain, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(model(rows.input_ids).logits[scored], plain, atol=1e-2)  # the policy's head moved


@pytest.mark.parametrize("strategy", ["full", "lora"])
def test_precomputed_reference_log_probabilities_equal_live_ones_and_are_reused(tmp_path, strategy):
    cache = tmp_path / "cache"
    live = prepared(tmp_path, "objective=dpo", f"strategy={strategy}")
    live_info = live[2].attach(live[1], live[3], live[0], live[4])
    assert live_info["reference"] == ("frozen copy" if strategy == "full" else "adapters disabled")
    runs = []
    for _ in range(2):
        cfg, model, objective, splits, hw = prepared(tmp_path, "objective=dpo", f"strategy={strategy}",
                                                     "objective.precompute_reference=true",
                                                     f"objective.reference_cache={cache}")  # fmt: skip
        runs.append((objective.attach(model, splits, cfg, hw), splits))
    (first, splits), (second, again) = runs
    assert first["reference_cache_hit"] is False and second["reference_cache_hit"] is True
    assert first["reference_cache"] == second["reference_cache"] and Path(first["reference_cache"]).is_file()
    assert first["reference"] == f"precomputed ({live_info['reference']})"
    for name in ("train", "validation", "test"):
        seqs = live[3][name].seqs
        rows = padded_batch(seqs, list(range(len(seqs))), live[2].pad_id)
        torch.testing.assert_close(splits[name].reference, live[2].reference.live(rows, 0), rtol=1e-5, atol=1e-5)
        assert torch.equal(again[name].reference, splits[name].reference)


def test_a_pair_in_one_forward_pass_equals_two_separate_passes(tmp_path):
    cfg, model, objective, splits, hw = prepared(tmp_path, "objective=dpo")
    batch = objective._batch(splits["train"], list(range(6)))
    assert batch.rows.input_ids.shape[0] == 12 and batch.normaliser == 6  # the chosen rows, then the rejected rows
    with torch.no_grad():
        together = sequence_logprobs(model, batch.rows.input_ids, batch.rows.labels)
        seqs = splits["train"].seqs
        chosen = padded_batch(seqs, splits["train"].pairs[:6, 0].tolist(), objective.pad_id)
        rejected = padded_batch(seqs, splits["train"].pairs[:6, 1].tolist(), objective.pad_id)
        apart = torch.cat([sequence_logprobs(model, b.input_ids, b.labels) for b in (chosen, rejected)])
    torch.testing.assert_close(together, apart, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["dpo", "kto"])
def test_one_step_is_the_same_update_for_8x1_and_2x4_micro_batches(tmp_path, name):
    """KTO too: its KL estimate is taken over the step, whatever the split."""
    updates, losses = [], []
    for micro, accum in ((8, 1), (2, 4)):
        cfg, model, objective, splits, hw = prepared(
            tmp_path, f"objective={name}", f"micro_batch_size={micro}", f"grad_accum_steps={accum}", "max_steps=1",
            "eval_interval=0", "optimizer=sgd", "optimizer.lr=1.0", "optimizer.momentum=0", "optimizer.grad_clip=null",
            "optimizer.warmup_ratio=0", "checkpoint.enabled=false",
        )  # fmt: skip
        objective.attach(model, splits, cfg, hw)
        before = [p.detach().clone() for p in model.parameters()]
        result = train(model, objective, splits, cfg, hw)
        updates.append([p.detach() - b for p, b in zip(model.parameters(), before, strict=True)])
        losses.append(result["loss_first"])
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    for a, b in zip(*updates, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- real runs
@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("dpo")
    args = [*preference_task(root), "objective=dpo", "objective.select=reward_accuracy", "micro_batch_size=8",
            "max_steps=30", "eval_interval=10", "checkpoint.interval=10", "log_interval=1", "optimizer.lr=1e-3"]  # fmt: skip
    run_here(args, root / "run")
    return root, args


def test_dpo_learns_the_preferred_answer_and_records_what_it_measures(dpo_run):
    root, _ = dpo_run
    r = json.loads((root / "run" / "metrics.json").read_text())
    assert (
        r["status"] == "completed" and r["objective"]["name"] == "dpo" and r["objective"]["reference"] == "frozen copy"
    )
    before, after = r["eval"]["baseline"]["validation"], r["eval"]["final"]["validation"]
    # the untrained policy is its reference: no reward, chance accuracy (ties count half), no divergence
    assert before["reward_accuracy"] == 0.5 and before["margin"] == 0 and before["token_kl"] == 0
    assert before["loss"] == pytest.approx(math.log(2), rel=1e-6)
    assert after["reward_accuracy"] > 0.9 and after["margin"] > 0 and after["loss"] < math.log(2)
    assert after["token_kl"] > 0 and after["chosen_reward"] > after["rejected_reward"]
    assert r["data"]["train"]["pairs"] == 120 and r["data"]["train"]["sequences"] == 240
    assert r["train"]["select"] == "reward_accuracy" and r["samples"][0]["reference"] == " Yes."


def test_a_run_starts_from_another_runs_final_weights(short_run, tmp_path):
    """Language modelling, then DPO from its weights with LoRA: the parent is the new base and the reference."""
    parent = json.loads((short_run / "metrics.json").read_text())
    args = [*preference_task(tmp_path, n=16, held_out=8), "objective=dpo", "strategy=lora", "max_steps=2", "eval_interval=0",
            "checkpoint.enabled=false", f"init_from={short_run}"]  # fmt: skip
    run_here(args, tmp_path / "child")
    child = json.loads((tmp_path / "child" / "metrics.json").read_text())
    assert child["init_from"] == {"run": str(short_run), "weights": "last", "step": parent["train"]["steps"],
                                  "strategy": "full", "objective": "lm",
                                  "folder": str(short_run / "checkpoints" / "step-000010")}  # fmt: skip
    assert child["objective"]["reference"] == "adapters disabled"
    before = child["eval"]["baseline"]["validation"]
    assert before["token_kl"] == 0 and before["reward_accuracy"] == 0.5  # the reference is the parent itself
    # the child starts from exactly the parent's final weights: the parent's model, rebuilt as export rebuilds it,
    # gives the child's log-probabilities before training, and the untrained model does not
    from transfer.export import pick_weights, read_run, rebuild, run_config

    record = read_run(short_run)
    parent_model, _ = rebuild(run_config(record, short_run), pick_weights(record, short_run, None))
    cfg = compose_config(args[:-1])
    untrained, tokenizer = load_model_and_tokenizer(cfg.model, cfg.block_size)
    objective = build_objective(cfg, tokenizer)
    validation, hw = objective.prepare(None)["validation"], resolve(cfg.hardware)
    logps = objective.policy_logps(parent_model, validation, cfg.eval_batch_size, hw)
    assert logps["chosen_logp"] == pytest.approx(before["chosen_logp"], rel=1e-6)
    assert logps["rejected_logp"] == pytest.approx(before["rejected_logp"], rel=1e-6)
    base = objective.policy_logps(untrained.eval(), validation, cfg.eval_batch_size, hw)
    assert base["chosen_logp"] != pytest.approx(before["chosen_logp"], rel=1e-3)


def test_pairs_that_truncation_makes_identical_are_left_out_and_warned_of(tmp_path):
    from transfer.run import data_warnings

    rows = [{"prompt": "Q", "chosen": "same start " * 8 + "A", "rejected": "same start " * 8 + "B"}] * 3
    rows += [{"prompt": "Q", "chosen": " Yes.", "rejected": " No."}] * 5
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = compose_config(["objective=dpo", "dataset=text_files", f"dataset.train_files=[{tmp_path / 'p.jsonl'}]",
                          f"dataset.validation_files=[{tmp_path / 'p.jsonl'}]", f"dataset.test_files=[{tmp_path / 'p.jsonl'}]",
                          "block_size=32", "micro_batch_size=8"])  # fmt: skip
    _, tokenizer = load_model_and_tokenizer(cfg.model, cfg.block_size)
    objective = build_objective(cfg, tokenizer)
    splits = objective.prepare(None)
    assert splits["train"].summary()["identical_after_truncation"] == 3 and len(splits["train"].pairs) == 5
    assert data_warnings(objective, splits, cfg) == [
        "the training split holds 5 examples, fewer than one step's 8 (micro_batch_size x grad_accum_steps): "
        "every step repeats examples",
        *(
            f"3 {s} pairs left out: cut to block_size=32, chosen and rejected were the same"
            for s in ("train", "validation", "test")
        ),
    ]


def test_kto_on_pairs_is_judged_like_the_paired_methods(tmp_path):
    cfg, model, objective, splits, hw = prepared(tmp_path, "objective=kto")
    objective.attach(model, splits, cfg, hw)
    result = objective.evaluate(model, splits["validation"], 16, hw, "validation")
    # the untrained policy is its reference: every reward 0, the KL estimate 0, the loss lambda/2 an answer
    assert result["reward_accuracy"] == 0.5 and result["margin"] == 0 and result["kto_kl"] == 0
    assert result["desirable_reward"] == 0 and result["undesirable_reward"] == 0 and result["token_kl"] == 0
    assert result["loss"] == pytest.approx(0.5) and result["examples"] == 2 * 24  # answers, unpaired


def test_a_reference_cache_edited_on_disk_is_computed_again_and_shared_by_strategies(tmp_path, caplog):
    """50 added to every cached log-probability (the checksum left as written): the entry is computed again, so the
    untrained policy's rewards stay 0, not -5; and a LoRA job finds the entry a full job wrote (the same base)."""
    args = ("objective=dpo", "objective.precompute_reference=true", f"objective.reference_cache={tmp_path / 'ref'}")
    cfg, model, objective, splits, hw = prepared(tmp_path, *args, "strategy=full")
    path = Path(objective.attach(model, splits, cfg, hw)["reference_cache"])
    kept = torch.load(path, weights_only=True)
    torch.save({k: v if k == "sha256" else v + 50 for k, v in kept.items()}, path)
    cfg, model, objective, again, hw = prepared(tmp_path, *args, "strategy=lora")
    info = objective.attach(model, again, cfg, hw)
    assert info["reference_cache"] == str(path) and info["reference_cache_hit"] is False
    assert f"cache entry {path} is damaged (its content differs from the checksum written with it)" in caplog.text
    for name in ("train", "validation", "test"):
        assert torch.equal(again[name].reference, splits[name].reference)
    before = objective.evaluate(model, again["validation"], 8, hw, "baseline")
    assert before["chosen_reward"] == pytest.approx(0, abs=1e-5) and before["reward_accuracy"] == 0.5
    cfg, model, objective, third, hw = prepared(tmp_path, *args, "strategy=full")
    assert objective.attach(model, third, cfg, hw)["reference_cache_hit"] is True  # written again, trusted again


def test_loss_chunk_tokens_zero_means_one_pass_over_the_whole_logits(tmp_path, monkeypatch):
    """hardware.loss_chunk_tokens=0 is autograd's path over the whole logits (schema): the preference objectives pass
    it on as it is, for the policy, the reference and KTO's KL estimate, instead of a chunk size of their own."""
    from transfer.objectives import preference, reference

    asked = []
    real = preference.sequence_logprobs
    for module in (preference, reference):  # the policy's, and the reference's
        monkeypatch.setattr(module, "sequence_logprobs", lambda *a, **k: asked.append(a[3]) or real(*a, **k))
    cfg, model, objective, splits, hw = prepared(tmp_path, "objective=kto", "hardware.loss_chunk_tokens=0")
    objective.attach(model, splits, cfg, hw)
    batches = [objective.batch(splits["train"], objective.stream(splits["train"], 0, 0, 4), 4)]
    objective.begin_step(model, batches, hw)
    objective.loss(model, batches[0], LossOptions.of(hw))
    assert hw.loss_chunk_tokens == 0 and len(asked) >= 3 and set(asked) == {0}


def test_a_preference_evaluation_logs_its_progress_where_no_bar_shows(tmp_path, monkeypatch, caplog):
    """On a 0.5B model a DPO evaluation of a few dozen pairs takes minutes: in a log file (no bar) it says how far it
    is, as the perplexity and choice evaluations do."""
    import io
    import logging
    import sys

    from transfer import fmt

    cfg, model, objective, splits, hw = prepared(tmp_path, "objective=dpo")
    objective.attach(model, splits, cfg, hw)
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # what tqdm writes to: not a terminal
    monkeypatch.setattr(fmt, "PROGRESS_EVERY_S", 0.0)
    with caplog.at_level(logging.INFO, logger="transfer.evaluation"):
        result = objective.evaluate(model, splits["validation"], 8, hw, "baseline validation")
    assert result["examples"] == 24  # pairs: 3 batches of 8
    done = [m.split(", about ")[0] for m in caplog.messages]
    assert done == ["baseline validation: 1 of 3 batches", "baseline validation: 2 of 3 batches"]

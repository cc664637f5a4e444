"""Each strategy's own learning rate: used when optimizer.lr is null, overridden by optimizer.lr for every strategy."""

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import FAST, run_here
from omegaconf import OmegaConf

from transfer.config.compose import CONF_DIR, check_command_line, compose_config, group_options
from transfer.config.folders import config_differences, resumable_config
from transfer.config.optimizer import learning_rate
from transfer.errors import TransferError
from transfer.models.load import load_model_and_tokenizer
from transfer.objectives import build_objective
from transfer.run import data_warnings
from transfer.strategies import apply_strategy
from transfer.training.checkpoint import CONFIG_FILE
from transfer.training.optim import build_optimizer
from transfer.training.restore import check_same_config

STRATEGIES = group_options("strategy")
CPU_STRATEGIES = [s for s in STRATEGIES if s != "qlora"]


def own_rate(strategy: str) -> float:
    """The rate the strategy's YAML file writes: each must write its own, not lean on the schema's default."""
    return OmegaConf.load(CONF_DIR / "strategy" / f"{strategy}.yaml")["lr"]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_each_strategy_brings_its_own_rate_when_optimizer_lr_is_null(strategy):
    cfg = compose_config([f"strategy={strategy}"])
    assert cfg.optimizer.lr is None
    assert learning_rate(cfg) == (own_rate(strategy), "strategy")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_optimizer_lr_overrides_every_strategy(strategy):
    cfg = compose_config([f"strategy={strategy}", "optimizer.lr=0.0123"])
    assert learning_rate(cfg) == (0.0123, "optimizer.lr")


def test_a_sweep_over_strategies_and_rates_gives_each_job_the_swept_rate():
    plan = check_command_line(["-m", "strategy=full,lora", "optimizer.lr=1e-4,0.02"])
    rates = sorted((c.strategy.name, *learning_rate(c)) for c in plan.configs)
    assert rates == [(s, lr, "optimizer.lr") for s in ("full", "lora") for lr in (1e-4, 0.02)]


def test_sgd_keeps_its_own_scale():
    cfg = compose_config(["optimizer=sgd", "strategy=lora"])
    assert learning_rate(cfg) == (OmegaConf.load(CONF_DIR / "optimizer" / "sgd.yaml")["lr"], "optimizer.lr")


def test_the_optuna_search_space_still_sets_the_rate():
    plan = check_command_line(["-m", "hparams_search=lora_lr_rank", "hydra.sweeper.n_trials=2"])
    assert {learning_rate(c) for c in plan.configs} == {(1e-5, "optimizer.lr"), (1e-2, "optimizer.lr")}


@pytest.mark.parametrize("strategy", CPU_STRATEGIES)
def test_every_param_group_gets_the_rate(strategy):
    cfg = compose_config([f"strategy={strategy}"])
    model, _ = load_model_and_tokenizer(cfg.model, 64)
    model, _ = apply_strategy(model, cfg.strategy, seed=0)
    optimizer = build_optimizer(model, cfg.optimizer, torch.device("cpu"), learning_rate(cfg)[0])
    assert optimizer.param_groups and {g["lr"] for g in optimizer.param_groups} == {own_rate(strategy)}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == trainable


@pytest.mark.parametrize("bad,message", [
    (["strategy.lr=0"], "strategy.lr=0.0 must be positive"),
    (["optimizer.lr=-1e-3"], "optimizer.lr=-0.001 must be positive (or null: the strategy's strategy.lr)"),
])  # fmt: skip
def test_a_rate_that_is_not_positive_is_one_line(bad, message):
    with pytest.raises(TransferError) as e:
        check_command_line(bad)
    assert str(e.value) == message


def test_resume_compares_the_rate_used_however_it_was_given(tmp_path):
    """A checkpoint saved with the rate written out (as before strategies had rates) resumes under the strategy's."""
    cfg = compose_config(["strategy=lora"])
    explicit = compose_config(["strategy=lora", f"optimizer.lr={own_rate('lora')}"])
    saved = resumable_config(explicit)
    assert "lr" not in saved["strategy"] and saved["optimizer"]["lr"] == own_rate("lora")
    (tmp_path / CONFIG_FILE).write_text(json.dumps(saved))
    check_same_config(tmp_path, cfg)
    # a record's config holds optimizer.lr null and the strategy's rate: the same training as the rate written out
    assert config_differences(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True), explicit) == []
    saved["optimizer"]["lr"] = own_rate("lora") * 2
    (tmp_path / CONFIG_FILE).write_text(json.dumps(saved))
    message = f"was made with optimizer.lr={own_rate('lora') * 2!r}, this run has optimizer.lr={own_rate('lora')!r}"
    with pytest.raises(TransferError, match=re.escape(message)):
        check_same_config(tmp_path, cfg)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory) -> Path:
    """Three steps of LoRA at a constant rate, optimizer.lr unset."""
    root = tmp_path_factory.mktemp("lr")
    run_here([*FAST, "strategy=lora", "max_steps=3", "eval_interval=0", "checkpoint.enabled=false",
              "optimizer.schedule=constant", "optimizer.warmup_ratio=0"], root / "run")  # fmt: skip
    return root / "run"


def test_a_run_trains_at_the_strategy_rate_and_records_where_it_came_from(lora_run):
    record = json.loads((lora_run / "metrics.json").read_text())
    assert record["optimizer"] == {"name": "adamw", "lr": own_rate("lora"), "lr_from": "strategy"}
    assert record["train"]["lr_last"] == own_rate("lora")  # the scheduler's rate at the last step: constant
    assert record["config"]["optimizer"]["lr"] is None and record["config"]["strategy"]["lr"] == own_rate("lora")


def test_a_model_other_than_tiny_without_optimizer_lr_gets_a_warning():
    cfg = compose_config(["strategy=lora", "block_size=64"])
    _, tokenizer = load_model_and_tokenizer(cfg.model, cfg.block_size, weights=False)
    objective = build_objective(cfg, tokenizer)
    splits = objective.prepare(4096)
    assert not [w for w in data_warnings(objective, splits, cfg) if "optimizer.lr" in w]  # tiny: its rates
    other = compose_config(["strategy=lora", "block_size=64", "model.name_or_path=/models/big"])
    assert [w for w in data_warnings(objective, splits, other) if "optimizer.lr" in w] == [
        f"optimizer.lr is unset: strategy.lr={own_rate('lora')} was chosen on the tiny model (docs/strategies.md); "
        "set optimizer.lr for /models/big"
    ]
    given = compose_config(["strategy=lora", "block_size=64", "model.name_or_path=/models/big", "optimizer.lr=1e-4"])
    assert not [w for w in data_warnings(objective, splits, given) if "optimizer.lr" in w]

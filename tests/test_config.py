"""Config composition through Hydra's compose API, and the schema's rejections."""

import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from transfer import schema
from transfer.errors import TransferError
from transfer.validate import check_command_line, check_config, compose_config, group_options

# Options that need a value the user must give.
CORPUS = Path(__file__).resolve().parent.parent / "transfer" / "corpora" / "rust_concepts"
REQUIRED = {
    ("model", "local"): ["model.name_or_path=some-org/some-model"],  # a hub name: not looked up until a job runs
    ("dataset", "text_files"): [f"dataset.train_files=[{CORPUS / 'train.jsonl'}]"],
    ("dataset", "hub"): ["dataset.path=Salesforce/wikitext"],
    # instruction tuning needs examples, which the default Rust prose is not
    ("objective", "sft"): [
        "dataset=text_files",
        f"dataset.train_files=[{Path(__file__).parent / 'data' / 'instructions.jsonl'}]",
    ],
    # instruction datasets whose files live outside the repository (../shared, or built by a task)
    ("dataset", "self_instruct"): ["objective=sft"],
    ("dataset", "movielens"): ["objective=sft"],
    ("dataset", "hh_rlhf_harmless"): ["objective=dpo"],
    # preference objectives need pairs
    **{
        ("objective", name): [
            "dataset=text_files",
            f"dataset.train_files=[{Path(__file__).parent / 'data' / 'pairs.jsonl'}]",
        ]
        for name in ("dpo", "ipo", "kto", "cpo", "orpo", "simpo")
    },
}
EXPECTED_TYPES = {
    ("dataset", "text_files"): schema.TextFilesDataset,
    ("dataset", "rust_concepts"): schema.TextFilesDataset,
    ("dataset", "hub"): schema.HubDataset,
    ("optimizer", "adamw"): schema.AdamWConfig,
    ("optimizer", "sgd"): schema.SGDConfig,
}
ALL_CHOICES = [(g, o) for g in schema.GROUPS for o in group_options(g)]


def test_every_group_has_options():
    assert group_options("model") == [
        "local", "qwen2_0_5b", "qwen2_5_0_5b", "qwen3_0_6b", "smollm2_135m", "tiny", "tiny_random",
    ]  # fmt: skip
    assert group_options("hardware") == ["auto", "cpu", "cuda"]
    assert group_options("optimizer") == ["adamw", "sgd"]
    assert {"rust_concepts", "text_files", "hub"} <= set(group_options("dataset"))
    assert "full" in group_options("strategy")


@pytest.mark.parametrize("group,option", ALL_CHOICES)
def test_every_choice_composes(group, option):
    cfg = compose_config([f"{group}={option}", *REQUIRED.get((group, option), [])])
    files = cfg.dataset.get("train_files") or []
    if option in ("qlora", "cuda") and not torch.cuda.is_available():
        with pytest.raises(TransferError, match="strategy=qlora needs a CUDA GPU|hardware.device=cuda but no CUDA"):
            check_config(cfg)  # refused at start-up, before any model is loaded
    elif files and not Path(files[0]).exists():  # not built or not here: the error says how to get them
        with pytest.raises(TransferError, match=f"no such file .*; {re.escape(cfg.dataset.build_hint)}"):
            check_config(cfg)
    else:
        check_config(cfg)
    assert cfg[group].name == option
    expected = EXPECTED_TYPES.get((group, option))
    if expected:
        assert OmegaConf.get_type(cfg[group]) is expected


def test_defaults():
    cfg = compose_config([])
    assert {g: cfg[g].name for g in schema.GROUPS} == {
        "model": "tiny",
        "strategy": "full",
        "objective": "lm",
        "dataset": "rust_concepts",
        "hardware": "auto",
        "optimizer": "adamw",
    }
    assert cfg.model.name_or_path is None and cfg.model.trust_remote_code is False
    assert cfg.dataset.train_files[0].endswith("transfer/corpora/rust_concepts/train.jsonl")


def test_hub_presets_name_their_models():
    names = {o: compose_config([f"model={o}"]).model.name_or_path for o in group_options("model") if o != "local"}
    assert names["qwen2_0_5b"] == "Qwen/Qwen2-0.5B"
    assert names["qwen2_5_0_5b"] == "Qwen/Qwen2.5-0.5B"
    assert names["qwen3_0_6b"] == "Qwen/Qwen3-0.6B"
    assert names["smollm2_135m"] == "HuggingFaceTB/SmolLM2-135M"


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["strategy=nope"], "unknown strategy 'nope'; allowed: "),
        (["model=gpt5"], "unknown model 'gpt5'; allowed: local, qwen2_0_5b"),
        (["optimizer.lrr=1"], "unknown key 'optimizer.lrr'; allowed keys there: name, lr,"),
        (["sed=3"], "unknown key 'sed'; allowed keys there: model, strategy"),
        (["optimizer=adamw", "optimizer.momentum=0.9"], "unknown key 'optimizer.momentum'"),
        (["optimizer.lr=fast"], "optimizer.lr: Value 'fast' of type 'str' could not be converted to Float"),
        (["max_steps=ten"], "max_steps: Value 'ten' of type 'str' could not be converted to Integer"),
        (["hardware.device=gpu"], "hardware.device: Invalid value 'gpu', expected one of [auto, cpu, cuda]"),
        (
            ["hardware.precision=fp8"],
            "hardware.precision: Invalid value 'fp8', expected one of [auto, fp32, bf16, fp16]",
        ),
        (["dataset=text_files"], "dataset.train_files"),
    ],
)
def test_schema_rejections_are_one_line(overrides, message):
    with pytest.raises(TransferError) as e:
        cfg = compose_config(overrides)
        check_config(cfg)  # a mandatory value left unset is found here
    text = str(e.value)
    assert message in text
    assert "\n" not in text


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["max_steps=0"], "max_steps=0 must be at least 1"),
        (["max_steps=null"], "max_steps and epochs are both null"),
        (["epochs=-1"], "epochs=-1.0 must be positive"),
        (["micro_batch_size=0"], "micro_batch_size=0 must be at least 1"),
        (["optimizer.lr=-1e-3"], "optimizer.lr=-0.001 must be positive"),
        (["optimizer.warmup_steps=200"], "optimizer.warmup_steps=200 must be below max_steps=200"),
        (["strategy=lora", "strategy.dropout=1.5"], "allowed r >= 1, alpha > 0, dropout in [0, 1)"),
        (["strategy=freeze_lower", "strategy.frozen_blocks=-2"], "strategy.frozen_blocks=-2: allowed an integer 0.."),
        (["strategy=adapter", "strategy.trained_blocks=0"], "strategy.trained_blocks=0: allowed an integer 1.."),
        (["strategy=lora", "strategy.modules_to_save=[lm_head]"], "'lm_head' is unknown; allowed: head, embeddings"),
        (["eval.probes.python_docs.max_tokens=1"], "eval.probes.python_docs.max_tokens=1: allowed 2 or more"),
        (["eval.max_tokens=0"], "eval.max_tokens=0: allowed 2 or more, or null for every token"),
        (["resume=/nonexistent"], "resume='/nonexistent': no such folder"),
        (["optimizer.betas=[0.9]"], "optimizer.betas=[0.9] must be two numbers"),
        (["optimizer=sgd", "optimizer.momentum=0", "optimizer.nesterov=true"], "nesterov"),
        (["dataset.holdout_fraction=1.5"], "dataset.holdout_fraction=1.5 must be in [0, 1)"),
    ],
)
def test_range_checks(overrides, message):
    cfg = compose_config(overrides)
    with pytest.raises(TransferError, match=None) as e:
        check_config(cfg)
    assert message in str(e.value)


def test_warmup_steps_take_precedence_over_the_ratio():
    check_config(compose_config(["optimizer.warmup_steps=10"]))  # the ratio in adamw.yaml is then unused


def test_bad_strategy_values_in_a_sweep_fail_at_start():
    with pytest.raises(TransferError, match="strategy r=0"):
        check_command_line(["-m", "strategy=lora", "strategy.r=8,0"])


def test_sweep_params_of_an_experiment_are_checked():
    check_command_line(["-m", "+experiment=smoke"])
    with pytest.raises(TransferError, match="unknown key 'strategy.frozen_blocks'"):
        check_command_line(["-m", "+experiment=smoke", "strategy.frozen_blocks=3"])  # full has no frozen_blocks
    with pytest.raises(
        TransferError, match="unknown experiment 'smok'; allowed: replay_sweep, smoke, strategy_comparison"
    ):
        check_command_line(["-m", "+experiment=smok"])


def test_a_typo_anywhere_in_a_sweep_fails_at_start():
    check_command_line(["-m", "strategy=full", "optimizer.lr=1e-4,3e-4"])
    with pytest.raises(TransferError, match="unknown optimizer 'adamm'"):
        check_command_line(["-m", "optimizer=sgd,adamm", "optimizer.lr=1e-4,3e-4"])
    with pytest.raises(TransferError, match="optimizer.lr: Value 'x'"):
        check_command_line(["-m", "optimizer.lr=1e-4,x"])


def test_command_line_without_sweep_is_checked_too():
    with pytest.raises(TransferError, match="unknown key 'block'"):
        check_command_line(["block=32"])
    check_command_line(["--help"])  # Hydra's own flags pass through


def test_compose_works_in_a_fresh_process():
    """validate.py alone must register the schema (a bench or notebook imports nothing else)."""
    import subprocess
    import sys

    code = "from transfer.validate import compose_config; print(list(compose_config([]).eval.probes))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "['python_docs']"

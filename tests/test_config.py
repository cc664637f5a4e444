"""Config composition through Hydra's compose API, and the schema's rejections."""

import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import cache_hub_model
from omegaconf import OmegaConf

from transfer.config import data, optimizer, schema
from transfer.config.checks import check_config
from transfer.config.compose import CONF_DIR, check_command_line, compose_config, group_options
from transfer.errors import TransferError

# Options that need a value the user must give.
CORPUS = Path(__file__).resolve().parent.parent / "transfer" / "corpora" / "rust_concepts"
REQUIRED = {
    ("model", "local"): ["model.name_or_path=some-org/some-model"],  # a hub name: in the cache of hub_cache
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
    ("dataset", "text_files"): data.TextFilesDataset,
    ("dataset", "rust_concepts"): data.TextFilesDataset,
    ("dataset", "hub"): data.HubDataset,
    ("optimizer", "adamw"): optimizer.AdamWConfig,
    ("optimizer", "sgd"): optimizer.SGDConfig,
}
ALL_CHOICES = [(g, o) for g in schema.GROUPS for o in group_options(g)]


def test_every_group_has_options():
    assert group_options("model") == [
        "local", "qwen2_0_5b", "qwen2_5_0_5b", "qwen2_5_coder_0_5b", "qwen3_0_6b", "smollm2_135m", "tiny",
        "tiny_random",
    ]  # fmt: skip
    assert group_options("hardware") == ["auto", "cpu", "cuda"]
    assert group_options("optimizer") == ["adamw", "sgd"]
    assert {"rust_concepts", "text_files", "hub"} <= set(group_options("dataset"))
    assert "full" in group_options("strategy")


@pytest.fixture(scope="module")
def hub_models(tmp_path_factory) -> Path:
    """A Hugging Face cache that holds the config groups' hub models (and some-org/some-model)."""
    cache = tmp_path_factory.mktemp("hub")
    for option in group_options("model"):
        name = compose_config([f"model={option}", *REQUIRED.get(("model", option), [])]).model.name_or_path
        if name:
            cache_hub_model(cache, name)
    return cache


@pytest.fixture
def hub_cache(hub_models, tmp_path, monkeypatch) -> Path:
    """Offline, with its own copy of hub_models' cache."""
    cache = shutil.copytree(hub_models, tmp_path / "hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


def test_a_hub_model_is_looked_up_once_at_start_up(hub_cache, monkeypatch):
    """Cached: checked without network. Not cached and offline: one line, at start-up. A path: no such folder."""
    check_config(compose_config(["model=qwen2_0_5b"]))
    not_cached = compose_config(["model=local", "model.name_or_path=some-org/other-model"])
    with pytest.raises(TransferError) as e:
        check_config(not_cached)
    assert str(e.value) == (
        "model.name_or_path='some-org/other-model' is not in the local Hugging Face cache, and the hub is unreachable "
        "(HF_HUB_OFFLINE is set); allowed: a model directory on disk, a hub model in the cache (download it where the "
        "hub is reachable: hf download some-org/other-model), or model=tiny"
    )
    cache_hub_model(hub_cache, "some-org/other-model")
    check_config(not_cached)  # a different cache: looked up again, found
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache.parent / "elsewhere"))
    from transfer.config import model

    monkeypatch.setattr(model, "hub_offline", lambda: False)
    monkeypatch.setattr(model, "_resolves", lambda host, timeout: False)  # a machine with no route to the hub
    with pytest.raises(TransferError, match=r"the hub is unreachable \(huggingface.co cannot be resolved\)"):
        check_config(not_cached)
    for path, what in (
        ("/no/such/model", "does not exist"),
        ("./mine", "does not exist"),
        (__file__, "is not a directory"),
    ):
        with pytest.raises(TransferError) as e:
            check_config(compose_config(["model=local", f"model.name_or_path={path}"]))
        assert str(e.value) == (
            f"model.name_or_path={path!r} {what}; allowed: a model directory on disk or a hub name like Qwen/Qwen2-0.5B"
        )


@pytest.mark.parametrize("group,option", ALL_CHOICES)
def test_every_choice_composes(group, option, hub_cache):
    cfg = compose_config([f"{group}={option}", *REQUIRED.get((group, option), [])])
    files = cfg.dataset.get("train_files") or []
    if option in ("qlora", "cuda") and not torch.cuda.is_available():
        with pytest.raises(TransferError, match="strategy=qlora needs a CUDA GPU|hardware.device=cuda but no CUDA"):
            check_config(cfg)  # refused at start-up, before any model is loaded
    elif cfg.model.build_hint and not Path(cfg.model.name_or_path).expanduser().is_dir():  # a model not built here
        with pytest.raises(TransferError, match=f"does not exist; {re.escape(cfg.model.build_hint)}$"):
            check_config(cfg)
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


@pytest.mark.parametrize(
    "overrides,message",
    [
        # nan and inf pass every comparison a range check makes (nan <= 0 is false): one finiteness check for all
        (["optimizer.lr=nan"], "optimizer.lr=nan: allowed a finite number"),
        (["optimizer.lr=inf"], "optimizer.lr=inf: allowed a finite number"),
        (["strategy.lr=-inf"], "strategy.lr=-inf: allowed a finite number"),
        (["optimizer.weight_decay=nan"], "optimizer.weight_decay=nan: allowed a finite number"),
        (["optimizer.grad_clip=inf"], "optimizer.grad_clip=inf: allowed a finite number"),
        (["optimizer.min_lr_ratio=nan"], "optimizer.min_lr_ratio=nan: allowed a finite number"),
        (["optimizer.warmup_ratio=nan"], "optimizer.warmup_ratio=nan: allowed a finite number"),
        (["optimizer.eps=inf"], "optimizer.eps=inf: allowed a finite number"),
        (["optimizer.betas=[nan,0.999]"], "optimizer.betas=[nan, 0.999]: allowed finite numbers"),
        (["epochs=inf", "max_steps=null"], "epochs=inf: allowed a finite number"),
        (["early_stopping.min_delta=nan"], "early_stopping.min_delta=nan: allowed a finite number"),
        (["dataset.holdout_fraction=nan"], "dataset.holdout_fraction=nan: allowed a finite number"),
        (["hardware.memory_limit=inf"], "hardware.memory_limit=inf: allowed a finite number"),
        (["strategy=lora", "strategy.dropout=nan"], "strategy.dropout=nan: allowed a finite number"),
        (["strategy=freeze_lower", "strategy.frozen_blocks=nan"], "strategy.frozen_blocks=nan: allowed a finite"),
        (["objective=dpo", "objective.beta=inf", *REQUIRED[("objective", "dpo")]], "objective.beta=inf: allowed a"),
        (
            ["objective=kto", "objective.desirable_weight=nan", *REQUIRED[("objective", "kto")]],
            "objective.desirable_weight=nan: allowed a finite number",
        ),
        # what torch's optimizers refuse with a traceback
        (["optimizer.eps=0"], "optimizer.eps=0.0 must be positive"),
        (["optimizer=sgd", "optimizer.momentum=-0.5"], "optimizer.momentum=-0.5 must be 0 or more"),
        # on_oom=cpu casts the weights to fp32, which bitsandbytes' 4-bit weights refuse
        (["strategy=qlora", "hardware.on_oom=cpu"], "hardware.on_oom=cpu would cast the weights to fp32 on the CPU"),
        # a block of one token holds no next token to predict
        (["block_size=1"], "block_size=1 must be at least 2"),
        # numpy's seed range; torch's generator takes seed x 100,003: both hold below 2**32
        (["seed=-1"], "seed=-1: allowed an integer 0..4294967295"),
        (["seed=4294967296"], "seed=4294967296: allowed an integer 0..4294967295"),
        (["dataset.split_seed=-3"], "dataset.split_seed=-3: allowed an integer 0..4294967295"),
        (["model.tiny.seed=-1"], "model.tiny.seed=-1: allowed an integer 0..4294967295"),
        (["strategy=scratch", "strategy.init_seed=-1"], "strategy.init_seed=-1: allowed an integer 0..4294967295"),
    ],
)
def test_values_that_would_fail_later_are_refused_at_start(overrides, message):
    cfg = compose_config(overrides)
    with pytest.raises(TransferError) as e:
        check_config(cfg)
    assert str(e.value).startswith(message), str(e.value)
    assert "\n" not in str(e.value)


def test_the_largest_seed_allowed_seeds_every_generator():
    from transfer.run import seed_everything

    cfg = compose_config(["seed=4294967295"])
    check_config(cfg)
    seed_everything(cfg.seed)  # numpy's bound, and the stream's torch generator below (data/sequences.py)
    torch.Generator().manual_seed(cfg.seed * 100_003 + 1)


def test_warmup_steps_take_precedence_over_the_ratio():
    from transfer.training.optim import build_scheduler

    def rates(*overrides):  # the learning rate at each of 100 steps, as the loop's scheduler sets it
        cfg = compose_config(["max_steps=100", "optimizer.lr=1.0", "optimizer.schedule=constant", *overrides])
        check_config(cfg)
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        scheduler = build_scheduler(optimizer, cfg.optimizer, total_steps=cfg.max_steps)
        out = []
        for _ in range(cfg.max_steps):
            out.append(scheduler.get_last_lr()[0])
            optimizer.step()
            scheduler.step()
        return out

    # 10 steps of warm-up, though the ratio alone would make it 50: lr * (step + 1) / 11, then the peak
    both = rates("optimizer.warmup_steps=10", "optimizer.warmup_ratio=0.5")
    assert both[:11] == pytest.approx([(step + 1) / 11 for step in range(10)] + [1.0], rel=1e-12)
    assert both[10:] == [1.0] * 90
    ratio = rates("optimizer.warmup_ratio=0.5")  # warmup_steps=0: the ratio's 50 steps
    assert ratio[10] == pytest.approx(11 / 51, rel=1e-12) and ratio[49] == pytest.approx(50 / 51) and ratio[50] == 1.0


def test_bad_strategy_values_in_a_sweep_fail_at_start():
    with pytest.raises(TransferError, match="strategy r=0"):
        check_command_line(["-m", "strategy=lora", "strategy.r=8,0"])


def test_sweep_params_of_an_experiment_are_checked():
    check_command_line(["-m", "+experiment=smoke"])
    with pytest.raises(TransferError, match="unknown key 'strategy.frozen_blocks'"):
        check_command_line(["-m", "+experiment=smoke", "strategy.frozen_blocks=3"])  # full has no frozen_blocks
    with pytest.raises(
        TransferError,
        match="unknown experiment 'smok'; allowed: qwen_strategies, replay_sweep, smoke, strategy_comparison",
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
    """config.compose alone must register the schema (a bench or notebook imports nothing else)."""
    import subprocess
    import sys

    code = "from transfer.config.compose import compose_config; print(list(compose_config([]).eval.probes))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "['python_docs']"


def test_config_imports_neither_torch_nor_transformers():
    """config/ is torch-free by contract: every sweep job is checked at start-up within a second."""
    import subprocess
    import sys

    import transfer.config

    modules = sorted(p.stem for p in Path(transfer.config.__file__).parent.glob("*.py") if p.stem != "__init__")
    code = "; ".join(
        [f"import transfer.config.{m}" for m in modules]
        + ["import sys", "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))"]
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["[]"], f"config/ ({', '.join(modules)}) loaded {proc.stdout.strip()}"


def test_each_registry_names_the_option_files():
    """The spec tables and the schema's registered classes name the YAML options of their groups, no more, no less."""
    from transfer.config.objective import OBJECTIVES
    from transfer.config.strategy import STRATEGIES

    assert sorted(OBJECTIVES) == group_options("objective")
    assert sorted(STRATEGIES) == group_options("strategy")
    for group, nodes in schema.NODES.items():
        named = set()
        for option in group_options(group):
            defaults = OmegaConf.load(CONF_DIR / group / f"{option}.yaml").get("defaults", [])
            named |= {d.split("@")[0] for d in defaults if isinstance(d, str) and d.startswith("/schema/")}
        assert named == {f"/schema/{group}/{option}" for option in nodes}, f"conf/{group}/ against schema.NODES"

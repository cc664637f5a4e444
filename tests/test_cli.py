"""Real runs of `python -m transfer` in a subprocess: one run, one sweep, bad input.

The run and the sweep are shared fixtures (conftest.py): several tests read each.
"""

import json
import math
from pathlib import Path

import pytest
from conftest import FAST, SHORT, copy_run, run_cli

from transfer.config.compose import compose_config
from transfer.models.load import build_model, byte_tokenizer, tiny_config


def record_of(folder: Path) -> dict:
    return json.loads((folder / "metrics.json").read_text())


def assert_sane(record: dict, steps: int) -> None:
    assert record["status"] == "completed" and record["error"] is None
    for when in ("baseline", "final"):
        for split in ("validation", "test"):
            result = record["eval"][when][split]
            assert math.isfinite(result["perplexity"]) and result["perplexity"] > 1
            assert math.isclose(result["perplexity"], math.exp(result["loss"]), rel_tol=1e-9)
    # the model learns the training domain: held-out Rust topics get easier
    assert record["eval"]["final"]["validation"]["perplexity"] < record["eval"]["baseline"]["validation"]["perplexity"]
    assert record["eval"]["final"]["validation"]["tokens"] == record["eval"]["baseline"]["validation"]["tokens"]
    train = record["train"]
    assert train["steps"] == steps
    cfg = record["config"]
    assert train["tokens"] == steps * cfg["micro_batch_size"] * cfg["grad_accum_steps"] * cfg["block_size"]
    assert train["seconds"] > 0 and train["tokens_per_second"] == pytest.approx(train["tokens"] / train["seconds"])
    assert math.isfinite(train["loss_first"]) and train["loss_last"] < train["loss_first"]
    p = record["params"]
    assert 0 < p["trainable"] <= p["total"]
    assert p["trainable_pct"] == pytest.approx(100 * p["trainable"] / p["total"], abs=1e-4)


def test_single_run_writes_a_sane_record(fast_run):
    record = record_of(fast_run)
    assert_sane(record, steps=30)
    assert record["choices"] == {
        "model": "tiny",
        "strategy": "full",
        "objective": "lm",
        "dataset": "rust_concepts",
        "hardware": "auto",
        "optimizer": "adamw",
        "probes": "python_docs",
    }
    # parameter counts are elements, and equal to the model's own numel sum
    cfg = compose_config(FAST)
    tok = byte_tokenizer()
    model = build_model(tiny_config(cfg.model.tiny, tok), seed=cfg.model.tiny.seed)
    assert record["params"]["total"] == sum(p.numel() for p in model.parameters())
    assert record["params"]["trainable"] == record["params"]["total"]  # strategy=full
    # validated every 10 steps and at the last one
    assert [v["step"] for v in record["train"]["validation_curve"]] == [10, 20, 30]
    assert list(fast_run.glob("events.out.tfevents.*")), "no TensorBoard events"
    assert (fast_run / ".hydra" / "overrides.yaml").is_file()


def test_tensorboard_holds_the_scalars(fast_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(fast_run))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "validation/loss", "validation/perplexity"} <= tags
    assert [e.step for e in events.Scalars("validation/loss")] == [0, 10, 20, 30]  # baseline, then every 10 steps
    lrs = [e.value for e in events.Scalars("train/lr")]  # log_interval=1
    peak = 1e-3  # strategy=full's own rate (optimizer.lr unset)
    assert len(lrs) == 30 and max(lrs) == pytest.approx(peak) and lrs[0] < lrs[1] and lrs[-1] < 0.2 * peak


def test_each_logger_named_in_the_config_gets_every_call_and_unknown_ones_are_one_line(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from transfer.config.compose import check_command_line
    from transfer.config.schema import Logger
    from transfer.errors import TransferError
    from transfer.training.loggers import LOGGERS, open_loggers

    assert set(LOGGERS) == {kind.value for kind in Logger}  # what the config allows is what exists
    assert open_loggers(compose_config(["logging.loggers=[]"]), tmp_path / "none").loggers == []
    # named twice, it is one logger: two writers would log every point twice
    with open_loggers(compose_config(["logging.loggers=[tensorboard,tensorboard]"]), tmp_path / "tb") as logger:
        assert len(logger.loggers) == 1
        logger.scalars({"train/loss": 2.5, "train/lr": 1e-3}, 7)
        logger.text("samples/0", "**prompt:** fn", None)
        logger.hparams({"strategy": "lora"}, {"final/validation_perplexity": 4.5})
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"tensors": 0})
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(7, 2.5)]
    assert "samples/0/text_summary" in events.Tags()["tensors"]
    assert "_hparams_/experiment" in events.PluginTagToContent("hparams")
    with pytest.raises(TransferError) as e:
        check_command_line(["logging.loggers=[comet]"])
    assert str(e.value) == "logging.loggers[0]: Invalid value 'comet', expected one of [tensorboard, mlflow, wandb]"


def test_two_job_sweep(two_job_sweep):
    jobs = sorted(two_job_sweep.glob("*/metrics.json"))
    assert [p.parent.name for p in jobs] == ["0", "1"]  # multirun/<date>/<time>/<job>/
    records = [json.loads(p.read_text()) for p in jobs]
    for r in records:
        assert_sane(r, steps=20)
    assert [r["config"]["optimizer"]["lr"] for r in records] == [1e-4, 1e-3]
    assert records[0]["params"] == records[1]["params"]
    # same seed, same data, same baseline: only the learning rate differs
    assert records[0]["eval"]["baseline"] == records[1]["eval"]["baseline"]
    # each job's start-up clock starts in the job: the second's does not count the first's training (the record says
    # which clock each used; their durations are not compared, as a loaded machine reorders them), and the overhead
    # is what the parts measured leave of the time to the first step
    first, second = records[0]["timing"], records[1]["timing"]
    assert first["clock_from"] == "process start" and second["clock_from"] == "job start"
    parts = ("memory_estimate", "model_load", "data_load", "baseline_eval_and_samples")  # the first: if estimated
    for timing in (first, second):
        assert set(parts[1:]) <= set(timing)
        measured = sum(timing.get(k, 0) for k in parts)
        assert timing["startup_overhead"] == pytest.approx(timing["to_first_step"] - measured)


def test_seeded_runs_repeat_exactly(short_run, tmp_path):
    assert run_cli([*SHORT, "hydra.run.dir=again"], cwd=tmp_path).returncode == 0
    a, b = record_of(short_run), record_of(tmp_path / "again")
    assert a["train"]["loss_curve"] == b["train"]["loss_curve"]
    assert a["eval"]["final"] == b["eval"]["final"]


@pytest.mark.parametrize(
    "args,message",
    [
        (["strategy=fulll"], "error: unknown strategy 'fulll'; allowed: "),
        (["optimizer.lrr=1e-3"], "error: unknown key 'optimizer.lrr'; allowed keys there: name, lr"),
        (["optimizer.lr=abc"], "error: optimizer.lr: Value 'abc' of type 'str' could not be converted to Float"),
        (
            ["-m", "optimizer.lr=1e-4,3e-4", "hardware=cpu,tpu"],
            "error: unknown hardware 'tpu'; allowed: auto, cpu, cuda",
        ),
    ],
)
def test_bad_overrides_fail_fast_before_any_work(tmp_path, args, message):
    proc = run_cli(args, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == message or proc.stderr.strip().startswith(message), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "multirun").exists()


def test_a_completed_run_is_never_overwritten(short_run, tmp_path):
    run = copy_run(short_run, tmp_path / "run")
    files = sorted(p for p in run.rglob("*") if p.is_file())
    before = {p: p.read_bytes() for p in files}
    proc = run_cli([*SHORT, "max_steps=6", "hydra.run.dir=run"], cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "error: run already holds a run (status completed); "
        "continue it with resume=true, or choose another output folder (hydra.run.dir)"
    )
    assert {p: p.read_bytes() for p in files} == before
    # resume=true on a finished run: nothing to do, nothing touched (not even .hydra/)
    proc = run_cli([*SHORT, "resume=true", "hydra.run.dir=run"], cwd=tmp_path)
    assert proc.returncode == 0 and "nothing to resume" in proc.stdout
    assert {p: p.read_bytes() for p in files} == before


def test_resume_true_without_the_run_folder_is_refused(tmp_path):
    proc = run_cli(["resume=true"], cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: resume=true but outputs/") and "hydra.run.dir=<the run folder>" in proc.stderr


def test_a_built_wheel_runs_outside_the_source_tree(tmp_path):
    """`pip install .` (not editable) must find the configs and the corpus inside the installed package."""
    import shutil
    import subprocess
    import sys

    repo = Path(__file__).resolve().parent.parent
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(repo / name, source / name)
    for package in ("transfer", "hydra_plugins"):
        shutil.copytree(repo / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "-q"]
    built = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", tmp_path / "dist", source],
                           capture_output=True, text=True, timeout=300)  # fmt: skip
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("transfer-*.whl")
    # the Optuna sweeper ships in Hydra's plugin namespace, which must stay open to other plugins (no __init__.py)
    names = __import__("zipfile").ZipFile(wheel).namelist()
    assert "hydra_plugins/transfer_optuna_sweeper/sweeper.py" in names and "hydra_plugins/__init__.py" not in names
    installed = subprocess.run([*pip, "install", "--no-deps", "--target", tmp_path / "site", wheel],
                               capture_output=True, text=True, timeout=300)  # fmt: skip
    assert installed.returncode == 0, installed.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**__import__("os").environ, "PYTHONPATH": str(tmp_path / "site"), "HF_HUB_OFFLINE": "1"}
    where = subprocess.run([sys.executable, "-c", "import transfer; print(transfer.__file__)"], cwd=elsewhere,
                           env=env, capture_output=True, text=True)  # fmt: skip
    assert where.stdout.strip() == str(tmp_path / "site" / "transfer" / "__init__.py")
    found = subprocess.run([sys.executable, "-c", "import sys; from hydra.core.plugins import Plugins; from "
                            "hydra.plugins.sweeper import Sweeper; (s,) = [c for c in Plugins.instance().discover(Sweeper) "
                            "if 'optuna' in c.__module__]; print(sys.modules[s.__module__].__file__)"],
                           cwd=elsewhere, env=env, capture_output=True, text=True)  # fmt: skip
    assert found.stdout.strip() == str(tmp_path / "site" / "hydra_plugins" / "transfer_optuna_sweeper" / "sweeper.py")
    proc = subprocess.run([sys.executable, "-m", "transfer", "dry_run=true", "hydra.run.dir=run"], cwd=elsewhere,
                          env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((elsewhere / "run" / "metrics.json").read_text())
    assert record["status"] == "dry_run"
    assert record["config"]["dataset"]["train_files"][0].startswith(str(tmp_path / "site" / "transfer" / "corpora"))


def test_a_sweep_over_a_hub_model_offline_is_refused_once_before_any_job(tmp_path, monkeypatch):
    """Two jobs of a hub model that is neither reachable (HF_HUB_OFFLINE=1) nor in the (empty) local cache."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    proc = run_cli(["-m", "model=qwen2_0_5b", "seed=1,2", "hydra.sweep.dir=sweep"], tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == (
        "error: model.name_or_path='Qwen/Qwen2-0.5B' is not in the local Hugging Face cache, and the hub is unreachable "
        "(HF_HUB_OFFLINE is set); allowed: a model directory on disk, a hub model in the cache (download it where the "
        "hub is reachable: hf download Qwen/Qwen2-0.5B), or model=tiny\n"
    )
    assert not (tmp_path / "sweep").exists()  # no job folder, no failed record


def test_help_lists_the_projects_groups_options_and_settings_without_importing_torch():
    """`python -m transfer --help`: the conf folders' groups and options, config.yaml's defaults and settings; Hydra's
    help composed the whole config first and listed its internal schema/ groups."""
    import subprocess
    import sys

    import yaml
    from omegaconf import OmegaConf

    from transfer.config.compose import CONF_DIR

    show = "import runpy, sys; sys.argv[1:] = ['--help']; runpy.run_module('transfer', run_name='__main__'); "
    show += "print(sorted({'torch', 'hydra', 'omegaconf'} & set(sys.modules)))"
    proc = subprocess.run([sys.executable, "-c", show], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    *text, imported = proc.stdout.strip().splitlines()
    assert imported == "[]"  # neither torch nor Hydra
    sections = "\n".join(text).split("\n\n")
    (groups,) = [s for s in sections if s.startswith("groups")]
    listed = {line.split()[0]: line.split(None, 1)[1].split(", ") for line in groups.splitlines()[1:]
              if not line.startswith(" " * 4)}  # fmt: skip
    folders = {p.parent.relative_to(CONF_DIR).as_posix() for p in CONF_DIR.rglob("*/*.yaml")}
    assert set(listed) == folders and "schema/strategy" not in listed
    for group, options in listed.items():
        assert [o.rstrip("*") for o in options] == sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
    default = compose_config([])
    chosen = {g: [o.rstrip("*") for o in options if o.endswith("*")] for g, options in listed.items()}
    assert chosen["model"] == [default.model.name] and chosen["strategy"] == [default.strategy.name]
    assert chosen["eval/probes"] == list(default.eval.probes) and chosen["experiment"] == []
    (settings,) = [s for s in sections if s.startswith("settings")]
    shown = dict(line.split()[0].split("=", 1) for line in settings.splitlines()[1:])
    assert {"max_steps", "eval.weights", "checkpoint.keep", "logging.loggers"} <= set(shown)
    assert not any(key.startswith(("hydra", "search", "defaults")) for key in shown)
    for key, value in shown.items():  # each default as the composed config has it
        if key != "GROUP.KEY":
            actual = OmegaConf.to_container(OmegaConf.create({"v": OmegaConf.select(default, key)}), enum_to_str=True)
            assert yaml.safe_load(value) == actual["v"], key


OWN_PRESET = """\
# @package _global_
defaults:
  - override /strategy: lora
max_steps: 20
strategy:
  {key}: 4
"""


@pytest.mark.parametrize(
    "key,args,message",
    [
        ("rank", ["+experiment=mine"], "error: own/experiment/mine.yaml: unknown key 'strategy.rank'; allowed keys "
         "there: name, lr, r, alpha, dropout, target_modules, use_rslora, modules_to_save"),
        ("r: abc\n  alpha", ["+experiment=mine"],
         "error: own/experiment/mine.yaml: strategy.r: Value 'abc' of type 'str' could not be converted to Integer"),
        ("r", ["+experiment=mien"], "error: unknown experiment 'mien'; allowed: mine, qwen_strategies, replay_sweep, "
         "smoke, strategy_comparison"),
        ("r", ["--config-name", "top"], "error: own/top.yaml: unknown key 'eval.bogus'; allowed keys there: probes, benchmarks, "
         "max_tokens, max_new_tokens, weights, cka, cka_blocks"),
        ("r", ["-m", "+experiment=mine", "seed=1,2", "max_steps=-1"],
         "error: max_steps=-1 must be at least 1 (or null to train by epochs)"),
    ],
)  # fmt: skip
def test_a_bad_key_in_your_own_config_files_is_one_line_naming_the_file(tmp_path, monkeypatch, key, args, message):
    """--config-dir and --config-name: Hydra reported a bad key there in several lines, without the file's path."""
    from transfer.cli import _check

    (tmp_path / "own" / "experiment").mkdir(parents=True)
    (tmp_path / "own" / "experiment" / "mine.yaml").write_text(OWN_PRESET.format(key=key))
    (tmp_path / "own" / "top.yaml").write_text("defaults:\n  - config\n  - _self_\neval:\n  bogus: 1\n")
    monkeypatch.chdir(tmp_path)
    assert _check(["--config-dir", "own", *args]) == (2, message)
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "multirun").exists()


def test_the_own_configs_page_works_as_written(tmp_path, monkeypatch):
    """docs/own-configs.md: its files, written where it says, compose; its example error is what the check says."""
    import re

    from transfer.config.compose import check_command_line
    from transfer.errors import TransferError

    page = (Path(__file__).resolve().parents[1] / "docs" / "own-configs.md").read_text()
    monkeypatch.chdir(tmp_path)
    for block in re.findall(r"```yaml\n(.*?)```", page, re.S):
        path = tmp_path / re.search(r"^# (\S+\.yaml)", block, re.M)[1]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(block)
    commands = re.findall(r"^python -m transfer (--config-dir .*?)(?:\s+#.*)?$", page, re.M)
    assert len(commands) == 5
    for command in commands:
        check_command_line(command.split())
    preset = tmp_path / "my_configs" / "experiment" / "lora_quick.yaml"
    preset.write_text(preset.read_text().replace("  r: 4", "  rank: 4"))
    with pytest.raises(TransferError) as e:
        check_command_line(["--config-dir", "my_configs", "+experiment=lora_quick"])
    assert f"error: {e.value}" in page
    with pytest.raises(TransferError) as e:
        check_command_line(["--config-dir", "my_configs", "+experiment=lora_quik"])
    assert f"error: {e.value}" in page
    preset.write_text(
        preset.read_text().replace("  rank: 4", "  r: 4") + "hydra:\n  sweeper:\n    params:\n      strategy.r: 4,abc\n"
    )
    with pytest.raises(TransferError) as e:
        check_command_line(["--config-dir", "my_configs", "-m", "+experiment=lora_quick"])
    assert f"error: {e.value}" in page


def test_a_reader_that_leaves_ends_a_command_quietly(monkeypatch, capsys):
    """`python -m transfer.aggregate | head` ended in a BrokenPipeError traceback; a run logging to the console, in a
    `--- Logging error ---` traceback a line. Printing stops at the closed pipe with status 1; logging goes on."""
    import logging
    import os
    import sys

    from transfer.fmt import reader_may_leave

    read, write = os.pipe()
    os.close(read)  # the reader has left before the first line
    monkeypatch.setattr(sys, "stdout", os.fdopen(write, "w"))
    monkeypatch.setattr(logging, "raiseExceptions", True)
    printed = []

    def report() -> int:
        for line in ("a", "b"):
            print(line, flush=True)
            printed.append(line)
        return 0

    assert reader_may_leave(report) == 1 and printed == []
    read, write = os.pipe()
    os.close(read)
    monkeypatch.setattr(sys, "stdout", os.fdopen(write, "w"))
    log = logging.getLogger("test_reader_left")
    logged = []

    def run() -> None:
        handler = logging.StreamHandler(sys.stdout)  # as Hydra's console handler takes it, once the job starts
        log.addHandler(handler)
        try:
            for step in range(3):
                log.warning("step %d", step)
                logged.append(step)
        finally:
            log.removeHandler(handler)
        sys.exit(3)

    assert reader_may_leave(run) == 3 and logged == [0, 1, 2]
    assert "Logging error" not in capsys.readouterr().err


def test_every_command_line_entry_point_ends_quietly_when_its_reader_leaves():
    """Each `if __name__ == "__main__":` of the package and the benchmarks runs its main through reader_may_leave."""
    import re

    root = Path(__file__).resolve().parents[1]
    mains = {p: p.read_text().split('if __name__ == "__main__":')[1:] for p in [*root.glob("transfer/**/*.py"),
                                                                             *root.glob("benchmarks/*.py")]}  # fmt: skip
    entry_points = {p.relative_to(root).as_posix(): parts[0] for p, parts in mains.items() if parts}
    assert len(entry_points) == 13, sorted(entry_points)  # 7 of the package's, 6 benchmarks
    for path, block in entry_points.items():
        assert "reader_may_leave(" in block and not re.search(r"\bmain\(\)", block), f"{path}: {block}"


@pytest.mark.parametrize(
    "preset,args,message",
    [
        ("hydra:\n  sweeper:\n    params:\n      strategy.r: 4,abc\n", [],
         "error: own/experiment/mine.yaml: hydra.sweeper.params strategy.r=4,abc: strategy.r: Value 'abc' of type "
         "'str' could not be converted to Integer"),
        ("", ["strategy.r=4,abc"], "error: strategy.r: Value 'abc' of type 'str' could not be converted to Integer"),
        ("", ["strategy=lora,lorra"], "error: unknown strategy 'lorra'; allowed: adapter, dora, freeze_embeddings, "
         "freeze_lower, full, ia3, loha, lora, qlora, scratch"),
    ],
)  # fmt: skip
def test_a_sweep_over_your_own_preset_is_checked_at_start_up(tmp_path, monkeypatch, preset, args, message):
    """A sweep's values, and those of a preset's hydra.sweeper.params, were checked only in each job with --config-dir:
    the sweep started, and each bad job failed in Hydra's lines without the preset's file."""
    from transfer.cli import _check

    (tmp_path / "own" / "experiment").mkdir(parents=True)
    (tmp_path / "own" / "experiment" / "mine.yaml").write_text(OWN_PRESET.format(key="r") + preset)
    monkeypatch.chdir(tmp_path)
    assert _check(["--config-dir", "own", "-m", "+experiment=mine", *args]) == (2, message)
    assert not (tmp_path / "multirun").exists()


def test_an_unknown_option_chosen_in_your_own_preset_names_the_preset(tmp_path, monkeypatch):
    from transfer.cli import _check

    (tmp_path / "own" / "experiment").mkdir(parents=True)
    (tmp_path / "own" / "experiment" / "mine.yaml").write_text(OWN_PRESET.format(key="r").replace("lora", "lorra"))
    monkeypatch.chdir(tmp_path)
    assert _check(["--config-dir", "own", "+experiment=mine"]) == (
        2,
        "error: own/experiment/mine.yaml: unknown strategy 'lorra'; allowed: adapter, dora, freeze_embeddings, "
        "freeze_lower, full, ia3, loha, lora, qlora, scratch",
    )
    assert _check(["--config-dir", "own", "--config-name", "mine"]) == (
        2, "error: --config-name mine: no such config; allowed: config"
    )  # fmt: skip


def test_a_config_path_in_a_package_is_read_from_where_the_package_is():
    """--config-path pkg://a.b names an installed package's folder, as Hydra reads it (dots or slashes)."""
    import argparse

    from transfer.config.compose import CONF_DIR, Source
    from transfer.errors import TransferError

    def source(path):
        return Source.of(argparse.Namespace(config_dir=None, config_path=path, config_name=None))

    assert source("pkg://transfer.conf").primary == source("pkg://transfer/conf").primary == CONF_DIR
    with pytest.raises(TransferError, match=r"^--config-path pkg://nosuch\.conf: no such folder"):
        source("pkg://nosuch.conf")

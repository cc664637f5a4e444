"""Hyper-parameter search through `hydra/sweeper=optuna`: real searches of the tiny model, the study in SQLite.

A search is killed in its second trial and continued with resume=true; pruning is judged on a
real study; bad search spaces are refused in one line before anything runs.
"""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from conftest import copy_run, run_cli
from omegaconf import OmegaConf

from transfer.aggregate.jobs import read_jobs
from transfer.aggregate.tables import comparison, for_people
from transfer.config.compose import check_command_line
from transfer.config.search import STUDY_SETTINGS, open_storage
from transfer.errors import TransferError
from transfer.training.pruning import Pruning

# a trial of the random tiny model (which any rate improves at first) in about a second, validated every 2 steps
TINY = [
    "model=tiny_random", "max_steps=8", "eval_interval=2", "block_size=32", "micro_batch_size=4", "eval_batch_size=32",
    "eval.max_tokens=512", "eval/probes=[]", "eval.max_new_tokens=2", "checkpoint.enabled=false",
    "hardware.estimate_memory=false",
]  # fmt: skip
SEARCH = [
    "-m",
    "hydra/sweeper=optuna",
    "strategy=lora",
    "optimizer.lr=tag(log, interval(1e-4, 1e-2))",
    "strategy.r=choice(2,4,8)",
]
METRIC = "eval.final.validation.loss"


def record_of(folder: Path) -> dict:
    return json.loads((folder / "metrics.json").read_text())


def load_study(sweep: Path) -> optuna.Study:
    return optuna.load_study(study_name="transfer", storage=f"sqlite:///{sweep.resolve() / 'optuna.db'}")


@pytest.fixture(scope="module")
def continued_search(tmp_path_factory) -> Path:
    """A search of 2 trials killed while its second trial trains, then continued with resume=true to 3 trials."""
    root = tmp_path_factory.mktemp("search")
    args = [*SEARCH, *TINY, "max_steps=16", "checkpoint.enabled=true", "checkpoint.interval=4",
            "tables_after_sweep=false", "hydra.sweep.dir=sweep"]  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "transfer", *args, "hydra.sweeper.n_trials=2"], cwd=root,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 120
    while time.time() < deadline and not list((root / "sweep" / "1" / "checkpoints").glob("step-*[0-9]")):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert record_of(root / "sweep" / "1")["status"] == "running", "the kill came too late: trial 1 had finished"
    proc = run_cli([*args, "hydra.sweeper.n_trials=3", "resume=true"], cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "sweep"


def test_a_killed_search_continues_its_study(continued_search):
    sweep = continued_search
    study = load_study(sweep)
    trials = study.get_trials()
    assert [t.number for t in trials] == [0, 1, 2]
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    records = {t.number: record_of(sweep / str(t.number)) for t in trials}  # trial N ran in job folder N
    # the killed trial went on from its checkpoint, in its folder, with the values the study drew for it
    assert records[1]["train"]["resumed_from_step"] >= 4 and records[1]["train"]["steps"] == 16
    for t in trials:
        config = records[t.number]["config"]
        assert config["search"]["trial"] == t.number and records[t.number]["status"] == "completed"
        assert (
            config["optimizer"]["lr"] == t.params["optimizer.lr"] and config["strategy"]["r"] == t.params["strategy.r"]
        )
        assert 1e-4 <= t.params["optimizer.lr"] <= 1e-2 and t.params["strategy.r"] in (2, 4, 8)
        assert t.value == records[t.number]["eval"]["final"]["validation"]["loss"]
    # the study's best is the best record's metric, and the summary says so
    best = min(trials, key=lambda t: t.value)
    assert study.best_value == min(r["eval"]["final"]["validation"]["loss"] for r in records.values())
    summary = yaml.safe_load((sweep / "optuna_best.yaml").read_text())
    assert summary["best"]["trial"] == best.number and summary["best"]["value"] == best.value
    assert summary["best"]["params"] == best.params and summary["trials"] == {"complete": 3}
    assert summary["metric"] == METRIC and summary["best"]["job"] == str((sweep / str(best.number)).resolve())
    # the second run's draws are not the first run's again (the sampler's seed moves on with the study)
    assert len({t.params["optimizer.lr"] for t in trials}) == 3


def test_a_search_prunes_trials_worse_than_the_median(tmp_path):
    """Needs train.py to report each validation (Pruning.report) and run.py to record status `pruned`.

    The random sampler with seed 10 draws 3e-3, 1e-6, 3e-3: once the first trial has completed, the
    1e-6 trial is far worse at its first validation than the median, and is stopped there.
    """
    args = ["-m", "hydra/sweeper=optuna", "optimizer.lr=choice(3e-3,1e-6)", *TINY, "hydra.sweeper.n_trials=3",
            "hydra.sweeper.sampler=random", "hydra.sweeper.seed=10", "hydra.sweeper.pruner=median",
            "hydra.sweeper.pruner_startup_trials=1", "tables_after_sweep=false", "hydra.sweep.dir=sweep"]  # fmt: skip
    proc = run_cli(args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep = tmp_path / "sweep"
    trials = load_study(sweep).get_trials()
    records = [record_of(sweep / str(t.number)) for t in trials]
    assert [t.params["optimizer.lr"] for t in trials] == [3e-3, 1e-6, 3e-3]
    assert [r["status"] for r in records] == ["completed", "pruned", "completed"]
    for t, r in zip(trials, records, strict=True):
        if r["status"] == "pruned":
            assert t.state == optuna.trial.TrialState.PRUNED and r["train"]["stop_reason"] == "pruned"
            assert r["train"]["steps"] == 2 and t.value == r["train"]["validation_curve"][-1]["loss"]
        else:
            assert t.state == optuna.trial.TrialState.COMPLETE and r["train"]["steps"] == 8
    table = comparison(read_jobs([sweep]))
    assert sorted(table["status"]) == ["completed", "completed", "pruned"]
    pruned = table[table["status"] == "pruned"].iloc[0]
    assert pruned["val_loss_after"] == records[1]["eval"]["final"]["validation"]["loss"]
    assert "search: best of 3 trials (2 complete, 1 pruned): trial " in proc.stdout


def test_a_pruned_trial_appears_in_the_table_and_plots_with_its_last_metrics(continued_search, tmp_path, monkeypatch):
    """The table side of pruning, on a record as run.py writes it for a pruned trial (status pruned)."""
    sweep = tmp_path / "sweep"
    for number in ("0", "1"):
        (sweep / number).mkdir(parents=True)
        record = record_of(continued_search / number)
        if number == "1":  # stopped at its first validation, before a final evaluation
            record.update(status="pruned")
            record["train"].update(stop_reason="pruned", validation_curve=record["train"]["validation_curve"][:1])
            del record["eval"]["final"]
        (sweep / number / "metrics.json").write_text(json.dumps(record))
    jobs = read_jobs([sweep])
    table = comparison(jobs)
    pruned = table[table["status"] == "pruned"].iloc[0]
    first = record_of(continued_search / "1")["train"]["validation_curve"][0]
    assert pruned["val_loss_after"] == first["loss"] and pruned["val_ppl_after"] == first["perplexity"]
    assert pruned["seeds"] == 1 and pruned["search.trial"] == 1
    shown = for_people(table)
    assert set(shown["status"]) == {"completed", "pruned"} and shown["val_ppl_after"].str.len().min() > 0
    # and in the plots: the search's history marks it where it stopped; its validation curve is dashed
    from transfer.aggregate import plots

    figures = {}

    def keep(fig, path):
        figures[path.name] = fig
        return path

    monkeypatch.setattr(plots, "_save", keep)
    plots.write_plots(jobs, table, tmp_path)
    history = figures["search_history.png"].axes[0]
    marks = {c.get_label(): c.get_offsets().tolist() for c in history.collections}
    assert marks["pruned (its last validation)"] == [[1, first["perplexity"]]]
    assert [x for x, _ in marks["completed"]] == [0]
    curves = figures["validation_curves.png"].axes[0].lines
    assert [line.get_linestyle() for line in curves if line.get_label().endswith("(pruned)")] == ["--"]


def _study_with_two_finished_trials(tmp_path) -> tuple[str, optuna.Study]:
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(storage=open_storage(url), study_name="s", direction="minimize")
    settings = {"pruner": "median", "pruner_startup_trials": 2, "pruner_warmup_steps": 0, "min_resource": None,
                "reduction_factor": 4, "metric": METRIC, "report": "loss"}  # fmt: skip
    study.set_user_attr(STUDY_SETTINGS, settings)
    for losses in ([4.0, 3.0], [4.2, 3.2]):
        trial = study.ask()
        for step, loss in zip((2, 4), losses, strict=True):
            trial.report(loss, step)
        study.tell(trial, losses[-1])
    return url, study


def _trial_config(url: str, number: int | None):
    return OmegaConf.create(
        {"search": {"trial": number, "study": "s", "storage": url}, "objective": {"select": "loss"}}
    )


def test_pruning_stops_a_trial_worse_than_the_median(tmp_path):
    from hydra_plugins.transfer_optuna_sweeper.sweeper import OptunaSweeper

    url, study = _study_with_two_finished_trials(tmp_path)
    worse, better = study.ask(), study.ask()
    pruning = Pruning.from_config(_trial_config(url, worse.number))
    assert pruning.report(2, {"loss": 5.0, "perplexity": 148.4}) is True  # the median at step 2 is 4.1
    keeps = Pruning.from_config(_trial_config(url, better.number))
    assert keeps.report(2, {"loss": 3.9}) is False
    assert keeps.report(4, {"loss": 3.05}) is False and keeps.report(4, {"loss": 9.0}) is False  # step 4 is kept once
    # the sweeper tells the study what the pruned job's record says: PRUNED, with the last value it reported
    sweeper = OptunaSweeper(metric=METRIC, direction="minimize")
    sweeper._tell(study, worse, {"status": "pruned"})
    told = study.get_trials()[worse.number]
    assert told.state == optuna.trial.TrialState.PRUNED and told.value == 5.0
    # outside a search a run is never pruned; a finished trial takes no reports
    assert Pruning.from_config(_trial_config(url, None)).report(2, {"loss": 1e9}) is False
    with pytest.raises(TransferError, match=r"^search.trial=0 of study 's' is complete; allowed: a running trial"):
        Pruning.from_config(_trial_config(url, 0))


def test_asha_prunes_below_the_rung(tmp_path):
    """ASHA ranks the trials that reached a rung through their own reports: each trial reports through Pruning."""
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(storage=open_storage(url), study_name="s", direction="minimize")
    study.set_user_attr(STUDY_SETTINGS, {"pruner": "asha", "min_resource": 2, "reduction_factor": 2, "report": None})
    reports = []
    for loss in (4.0, 4.2, 4.4, 5.0):
        trial = study.ask()
        reports.append(Pruning.from_config(_trial_config(url, trial.number)).report(2, {"loss": loss}))
        study.tell(trial, loss)
    assert reports[0] is False and reports[-1] is True  # the first has no rival yet; the worst of four is stopped


@pytest.mark.parametrize(
    "args,message",
    [
        (["optimizer.lrr=interval(1e-5, 1e-2)"], "unknown key 'optimizer.lrr'; allowed keys there: name, lr,"),
        (["hydra.sweeper.params.strategy.r=choice(4,8)"], "unknown key 'strategy.r'; allowed keys there: name"),
        (["strategy=lora", "strategy.r=choice(4,0)"], "strategy r=0, alpha=32, dropout=0.05: allowed r >= 1"),
        (["optimizer.lr=interval(0, 1e-2)"], "optimizer.lr=0.0 must be positive"),
        (["optimizer.lr=tag(log, interval(0, 1e-2))"], "optimizer.lr=tag(log, interval(0, 1e-2)): a log scale needs low > 0"),
        (["strategy=lora", "strategy.r=interval(4, 16)"],
         "strategy.r=interval(4, 16): strategy.r is an integer and interval(4, 16) draws fractions; write strategy.r=int(interval(4, 16))"),
        (["optimizer.lr=glob(*)"], "optimizer.lr=glob(*): glob() picks config files for a grid"),
        (["max_steps=10"], "hydra/sweeper=optuna has nothing to search"),
        (["optimizer.lr=interval(1e-4, 1e-3)", "hydra.sweeper.pruner=hyperband"], "hydra.sweeper.pruner=hyperband: allowed none, median, asha"),
        (["optimizer.lr=interval(1e-4, 1e-3)", "hydra.sweeper.metric=eval.final.validation.auc"],
         "hydra.sweeper.direction=minimize but hydra.sweeper.metric=eval.final.validation.auc (auc) is better higher; allowed: direction=maximize"),
        (["optimizer.lr=interval(1e-4, 1e-3)", "search.trial=3"], "search.trial=3: search.* is set by the sweeper"),
    ],
)  # fmt: skip
def test_bad_search_spaces_are_refused_in_one_line(args, message):
    with pytest.raises(TransferError) as e:
        check_command_line(["-m", "hydra/sweeper=optuna", *args])
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_a_search_space_in_a_config_file_is_checked_and_counted():
    plan = check_command_line(["-m", "hparams_search=lora_lr_rank", "hydra.sweeper.n_trials=8"])
    assert plan.jobs == 8 and not plan.by_number
    # every value the search may draw: the rank's choices, the learning rate's bounds
    assert sorted({c.strategy.r for c in plan.configs}) == [4, 8, 16, 32]
    assert {c.optimizer.lr for c in plan.configs} == {1e-5, 1e-2}
    assert {c.strategy.name for c in plan.configs} == {"lora"}
    with pytest.raises(TransferError, match=r"^hydra/sweeper=optuna runs a search of several trials: add -m"):
        check_command_line(["hparams_search=lora_lr_rank"])


def test_the_command_line_names_a_bad_key_and_runs_nothing(tmp_path):
    proc = run_cli([*SEARCH, "optimizer.lrr=interval(1e-5, 1e-2)"], cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: unknown key 'optimizer.lrr'") and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "multirun").exists()


def _old_study(sweep: Path) -> Path:
    """A study of two trials as a search of SEARCH's space leaves it, made before studies kept their space."""
    sweep.mkdir(parents=True)
    study = optuna.create_study(storage=f"sqlite:///{sweep / 'optuna.db'}", study_name="transfer")
    space = {"optimizer.lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True),
             "strategy.r": optuna.distributions.CategoricalDistribution((2, 4, 8))}  # fmt: skip
    for value in (3.0, 2.5):
        study.tell(study.ask(space), value)
    return sweep / "optuna.db"


def test_a_damaged_study_file_is_one_line_naming_it(tmp_path):
    """optuna.db cut short (a full disk, a copy that stopped): resume=true names the file, and changes nothing."""
    db = _old_study(tmp_path / "sweep")
    db.write_bytes(db.read_bytes()[: db.stat().st_size // 2])
    damaged = db.read_bytes()
    with pytest.raises(TransferError) as e:
        check_command_line([*SEARCH, f"hydra.sweep.dir={db.parent}", "resume=true"])
    assert str(e.value) == (
        f"{db} is not a readable Optuna study (database disk image is malformed); allowed: the file that search "
        "wrote, intact, or another hydra.sweep.dir (or hydra.sweeper.storage) to start afresh"
    )
    assert db.read_bytes() == damaged
    # and where the sweeper or a trial opens it (a storage the start-up check does not read)
    with pytest.raises(TransferError, match=rf"^{db} is not a readable Optuna study \(database disk image"):
        open_storage(f"sqlite:///{db}")


def test_an_emptied_study_file_on_resume_is_refused(tmp_path):
    """optuna.db emptied (0 bytes) beside the trials' folders: resume=true would start a new study over them."""
    db = _old_study(tmp_path / "sweep")
    (db.parent / "0").mkdir()
    (db.parent / "0" / "metrics.json").write_text(
        json.dumps({"status": "running", "config": {"search": {"study": "transfer"}}})
    )
    db.write_bytes(b"")
    with pytest.raises(TransferError) as e:
        check_command_line([*SEARCH, f"hydra.sweep.dir={db.parent}", "resume=true"])
    assert str(e.value) == (
        f"resume: {db.parent} holds 1 trial of study 'transfer', and {db} holds no such study; allowed: the "
        "optuna.db that search wrote, or another hydra.sweep.dir to start afresh"
    )


def test_resuming_a_study_with_another_search_space_is_refused(continued_search, tmp_path):
    """The search ran with optimizer.lr in [1e-4, 1e-2]: continuing it in [1e-5, 1e-2] would mix two searches."""
    kept = load_study(continued_search).user_attrs["space"]  # the sweeper keeps the space it searched
    assert {key: value["text"] for key, value in kept.items()} == {
        "optimizer.lr": "optimizer.lr=tag(log, interval(1e-4, 1e-2))", "strategy.r": "strategy.r=choice(2,4,8)"
    }  # fmt: skip
    sweep = copy_run(continued_search, tmp_path / "sweep")
    before = {p: p.read_bytes() for p in sweep.rglob("*") if p.is_file()}
    url = f"sqlite:///{(sweep / 'optuna.db').resolve()}"
    allowed = "allowed: the study's own search space, or another hydra.sweeper.study_name (or hydra.sweep.dir) for a new study"
    same = [o for o in SEARCH if not o.startswith("optimizer.lr=")]
    for changed, message in [
        ("optimizer.lr=tag(log, interval(1e-5, 1e-2))", "searched optimizer.lr=tag(log, interval(1e-4, 1e-2)), "
         "this command optimizer.lr=tag(log, interval(1e-5, 1e-2))"),
        ("optimizer.lr=interval(1e-4, 1e-2)", "searched optimizer.lr=tag(log, interval(1e-4, 1e-2)), "
         "this command optimizer.lr=interval(1e-4, 1e-2)"),
        ("strategy.dropout=choice(0.0,0.1)", "searched no strategy.dropout, this command strategy.dropout=choice(0.0,0.1)"),
    ]:  # fmt: skip
        args = (
            [*same, "optimizer.lr=tag(log, interval(1e-4, 1e-2))", changed]
            if changed.startswith("strategy.")
            else [*same, changed]
        )
        with pytest.raises(TransferError) as e:
            check_command_line([*args, *TINY, f"hydra.sweep.dir={sweep}", "resume=true"])
        assert str(e.value) == f"study 'transfer' in {url} {message}; {allowed}"
    check_command_line([*SEARCH, *TINY, f"hydra.sweep.dir={sweep}", "resume=true"])  # its own space
    assert {p: p.read_bytes() for p in sweep.rglob("*") if p.is_file()} == before
    # a study from before the space was kept: its trials' distributions say what it searched
    old = _old_study(tmp_path / "old")
    with pytest.raises(
        TransferError, match=r"searched strategy.r=choice\(2,4,8\), this command strategy.r=choice\(2,4\);"
    ):
        check_command_line([*SEARCH[:-1], "strategy.r=choice(2,4)", f"hydra.sweep.dir={old.parent}", "resume=true"])


def test_a_search_whose_metric_never_arrives_fails_with_one_line(tmp_path):
    """The language-model objective reports no AUC: no trial can be told a value, and the search must say so."""
    args = ["-m", "hydra/sweeper=optuna", "optimizer.lr=interval(1e-4, 1e-2)", *TINY, "hydra.sweeper.n_trials=1",
            "hydra.sweeper.metric=eval.final.validation.auc", "hydra.sweeper.direction=maximize",
            "hydra.sweep.dir=sweep"]  # fmt: skip
    proc = run_cli(args, cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    sweep = (tmp_path / "sweep").resolve()
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: no trial of study 'transfer' produced eval.final.validation.auc (1 fail): trial 0 "
        f"({sweep / '0'}): its record has no eval.final.validation.auc; its eval.final.validation holds loss, "
        "perplexity, tokens"
    )
    assert yaml.safe_load((sweep / "optuna_best.yaml").read_text())["best"] is None
    assert (sweep / "tables" / "comparison.csv").is_file()  # the tables of what ran, all the same


def test_a_search_whose_every_trial_failed_says_why_the_first_did(tmp_path, capsys):
    """The sweeper's summary, and the command's exit status from it, for trials whose jobs failed."""
    from hydra_plugins.transfer_optuna_sweeper.sweeper import OptunaSweeper
    from transfer.config.compose import Plan
    from transfer.sweep.launchers import exit_status

    sweep = tmp_path / "sweep"
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'optuna.db'}", study_name="transfer")
    for number, error in enumerate(["ValueError: bad rank", "out of memory"]):
        (sweep / str(number)).mkdir(parents=True)
        (sweep / str(number) / "metrics.json").write_text(json.dumps({"status": "failed", "error": error}))
        trial = study.ask()
        trial.set_user_attr("job", str(sweep / str(number)))
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
    sweeper = OptunaSweeper(metric=METRIC, direction="minimize")
    sweeper.sweep_dir, sweeper.url = sweep, "sqlite:///x"
    summary = sweeper._summarize(study)
    line = (
        f"no trial of study 'transfer' produced {METRIC} (2 fail): trial 0 ({sweep / '0'}) failed: ValueError: bad rank"
    )
    assert summary["best"] is None and summary["error"] == line
    capsys.readouterr()
    assert exit_status(Plan(sweep, True, 2, [], [], by_number=False)) == 1
    assert capsys.readouterr().err == f"error: {line}\n"  # the search's line, not one per job besides


def test_the_sweeper_refuses_a_damaged_or_other_study_in_one_line(tmp_path, capsys):
    """What the start-up check cannot read (a study in a database server, say) the sweeper refuses the same way."""
    import dataclasses

    from hydra_plugins.transfer_optuna_sweeper.config import OptunaSweeperConf
    from hydra_plugins.transfer_optuna_sweeper.sweeper import OptunaSweeper

    db = _old_study(tmp_path / "sweep")
    settings = {k: v for k, v in dataclasses.asdict(OptunaSweeperConf()).items() if k != "_target_"}
    sweeper = OptunaSweeper(**{**settings, "storage": f"sqlite:///{db}"})
    sweeper.sweep_dir, sweeper.config = tmp_path / "sweep", OmegaConf.create({})
    space = ["optimizer.lr=tag(log, interval(1e-4, 1e-2))", "strategy.r=choice(2,4)"]
    with pytest.raises(SystemExit) as e:
        sweeper.sweep(space)
    assert e.value.code == 2
    assert capsys.readouterr().err == (
        f"error: study 'transfer' in sqlite:///{db} searched strategy.r=choice(2,4,8), this command strategy.r=choice(2,4); "
        "allowed: the study's own search space, or another hydra.sweeper.study_name (or hydra.sweep.dir) for a new study\n"
    )
    assert len(optuna.load_study(study_name="transfer", storage=f"sqlite:///{db}").trials) == 2  # none was asked for
    db.write_bytes(db.read_bytes()[: db.stat().st_size // 2])
    with pytest.raises(SystemExit) as e:
        sweeper.sweep(space)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {db} is not a readable Optuna study (database disk image is malformed); allowed: ")
    assert err.count("\n") == 1

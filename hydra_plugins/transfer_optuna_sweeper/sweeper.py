"""The Optuna sweeper: ask the study for a batch of trials, launch them as jobs, tell it what their records say.

Each trial is one job of the sweep, in the folder Hydra gives job N; the job learns its trial
from `search.trial`, `search.study` and `search.storage` and reports to it (transfer.training.pruning.Pruning).
A job's result is read from its record, not from the launcher's return value, so that the same
sweep works through any launcher (the jobs may run in other processes or on other machines).
"""

import logging
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from transfer.config.search import (
    SPACE,
    STUDY_SETTINGS,
    check_same_space,
    damaged_study,
    format_value,
    open_storage,
    reported_metric,
    search_space,
    storage_url,
)
from transfer.errors import TransferError
from transfer.record import read_record
from transfer.sweep.search import SUMMARY_NAME, make_sampler, outcome, stored_space

log = logging.getLogger(__name__)
# a record that says its job has not ended: the job was killed, and resume=true continues it
UNFINISHED = (None, "running", "interrupted")


class OptunaSweeper(Sweeper):
    def __init__(self, **settings: Any) -> None:
        self.settings = settings
        self.config: DictConfig | None = None
        self.launcher = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context = config, hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            config=config, hydra_context=hydra_context, task_function=task_function
        )
        self.sweep_dir = Path(config.hydra.sweep.dir).resolve()
        # job N's folder is <sweep>/N unless hydra.sweep.subdir says otherwise; then it is known after the launch
        self.numbered = OmegaConf.to_container(config.hydra.sweep, resolve=False).get("subdir") == "${hydra.job.num}"

    def sweep(self, arguments: list[str]) -> None:
        """The search; what stops it (a damaged study file, a study of another space) is one line and exit status 2:
        the start-up check (transfer.config.search.check_study) says the same before anything runs, where it can."""
        self.url = storage_url(self.settings["storage"], self.sweep_dir)
        try:
            with damaged_study(self.url):
                self._search(arguments)
        except TransferError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    def _search(self, arguments: list[str]) -> None:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own lines say what Optuna would, per trial
        s = self.settings
        space, fixed = search_space(s["params"], arguments)
        # a new trial starts afresh; a killed one is continued with resume=true whatever the command line said
        self.fixed = [line for line in fixed if not line.lstrip("+~").startswith("resume=")]
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, self.sweep_dir / "multirun.yaml")
        study = optuna.create_study(
            storage=open_storage(self.url), study_name=s["study_name"], direction=s["direction"], load_if_exists=True
        )
        if study.direction.name.lower() != s["direction"]:
            raise TransferError(
                f"study {s['study_name']!r} in {self.url} was made to {study.direction.name.lower()}; "
                f"allowed hydra.sweeper.direction={study.direction.name.lower()}, or another study_name"
            )
        check_same_space(study, space, self.url)  # and a new study keeps its space, for the next run to check
        if SPACE not in study.user_attrs:
            study.set_user_attr(SPACE, stored_space(space))
        # the jobs build their pruner from the study's settings: one pruner for every trial, whoever launched it
        pruning = {k: s[k] for k in ("pruner", "pruner_startup_trials", "pruner_warmup_steps", "min_resource",
                                     "reduction_factor")}  # fmt: skip
        study.set_user_attr(STUDY_SETTINGS, {**pruning, "metric": s["metric"], "report": reported_metric(s["metric"])})
        seed = s["seed"] if s["seed"] is not None else self.config.get("seed")
        # a continued study must not draw its first trials' values again: the seed moves on by the trials it holds
        done = len(study.get_trials(deepcopy=False))
        study.sampler = make_sampler(s["sampler"], None if seed is None else seed + done, s["startup_trials"])
        distributions = {key: param.distribution() for key, param in space.items()}
        log.info("study %r in %s: %d trial(s) there, %d asked for; searching %s", s["study_name"], self.url, done,
                 s["n_trials"], ", ".join(p.text for p in space.values()) or "nothing")  # fmt: skip
        self.next_job = self._first_free_job_number(study)
        self._continue_killed(study)
        while True:
            left = s["n_trials"] - len(study.get_trials(deepcopy=False))
            if left <= 0:
                break
            trials = [study.ask(distributions) for _ in range(min(left, s["n_jobs"]))]
            self._launch(study, trials, self.next_job, continuing=False)
        self._summarize(study)

    # ------------------------------------------------------------ trials and jobs
    def _first_free_job_number(self, study) -> int:
        numbers = [int(p.name) for p in self.sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()]
        numbers += [t.user_attrs["job_num"] for t in self._ours(study) if "job_num" in t.user_attrs]
        return max(numbers, default=-1) + 1

    def _ours(self, study, states=None) -> list:
        return [
            t
            for t in study.get_trials(deepcopy=False, states=states)
            if t.user_attrs.get("sweep") == str(self.sweep_dir)
        ]

    def _continue_killed(self, study) -> None:
        """Trials of this sweep folder left RUNNING by a kill: told from their records, or launched again to finish."""
        from optuna.trial import TrialState

        for trial in self._ours(study, states=(TrialState.RUNNING,)):
            folder = trial.user_attrs.get("job")
            if not folder:  # killed before its launch came back, in a layout only the launch tells
                study.tell(trial.number, state=TrialState.FAIL)
                log.warning("trial %d failed: stopped before its job folder was known", trial.number)
                continue
            record = self._record(Path(folder))
            if (record or {}).get("status") in UNFINISHED:
                log.info("trial %d was stopped before it finished: continuing it in %s", trial.number, folder)
                self._launch(study, [trial], trial.user_attrs["job_num"], continuing=True)
            else:
                self._tell(study, trial, record)

    def _launch(self, study, trials: list, first_job: int, continuing: bool) -> None:
        batch = []
        for offset, trial in enumerate(trials):
            number = first_job + offset
            if not continuing:  # where to find the job after a kill: the folder Hydra will give it
                trial.set_user_attr("sweep", str(self.sweep_dir))
                trial.set_user_attr("job_num", number)
                trial.set_user_attr("job", str(self.sweep_dir / str(number)) if self.numbered else "")
            params = [f"{key}={format_value(value)}" for key, value in trial.params.items()]
            search = [f"search.trial={trial.number}", f"search.study={_quoted(study.study_name)}",
                      f"search.storage={_quoted(self.url)}"]  # fmt: skip
            batch.append([*self.fixed, *params, *search, *(["resume=true"] if continuing else [])])
        self.next_job = max(self.next_job, first_job + len(trials))
        returns = self.launcher.launch(batch, initial_job_idx=first_job)
        for offset, (trial, ret) in enumerate(zip(trials, returns, strict=True)):
            folder = self._job_folder(ret, first_job + offset)
            if not continuing and not self.numbered and folder is not None:
                trial.set_user_attr("job", str(folder))
            self._tell(study, trial, self._record(folder))

    def _job_folder(self, ret, number: int) -> Path | None:
        try:
            return Path(ret.hydra_cfg.hydra.runtime.output_dir)
        except AttributeError:  # a launcher that returns no config: Hydra's default layout
            return self.sweep_dir / str(number) if self.numbered else None

    @staticmethod
    def _record(folder: Path | None) -> dict | None:
        try:
            return read_record(folder) if folder is not None else None
        except ValueError:  # not JSON: told as failed
            return {"status": "unreadable", "error": "metrics.json is unreadable"}

    def _tell(self, study, trial, record: dict | None) -> None:
        from optuna.trial import TrialState

        if (record or {}).get("status") in ("running", "interrupted"):
            log.warning("trial %d was stopped (%s); resume=true continues it", trial.number, record["status"])
            return
        state, value, why = outcome(record, self.settings["metric"])
        if state == "COMPLETE":
            study.tell(trial.number, value)
            log.info("trial %d: %s = %.6g", trial.number, self.settings["metric"], value)
        elif state == "PRUNED":  # Optuna keeps the last value the trial reported
            frozen = study.tell(trial.number, state=TrialState.PRUNED)
            log.info("trial %d pruned at step %s", trial.number, frozen.last_step)
        else:
            study.tell(trial.number, state=TrialState.FAIL)
            log.warning("trial %d failed: %s", trial.number, why)

    # ------------------------------------------------------------ the end
    def _summarize(self, study) -> dict:
        from optuna.trial import TrialState

        trials = study.get_trials(deepcopy=False)
        counts = dict(Counter(t.state.name.lower() for t in trials))
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        best = study.best_trial if complete else None
        summary = {
            "study": study.study_name,
            "storage": self.url,
            "metric": self.settings["metric"],
            "direction": self.settings["direction"],
            "trials": counts,
            "best": None
            if best is None
            else {"trial": best.number, "value": best.value, "params": best.params, "job": best.user_attrs.get("job")},
        }
        tally = ", ".join(f"{n} {state}" for state, n in counts.items())
        if best is None:  # the command then exits non-zero with this line (transfer.sweep.launchers.exit_status)
            summary["error"] = (
                f"no trial of study {study.study_name!r} produced {self.settings['metric']} ({tally or 'no trial'})"
                + (f": {self._first_failure(trials)}" if trials else "")
            )
        path = self.sweep_dir / SUMMARY_NAME
        OmegaConf.save(OmegaConf.create(summary), path)
        if best is None:
            print(f"search: no trial completed ({tally}); study {study.study_name!r} in {self.url}")
        else:
            params = " ".join(f"{k}={format_value(v)}" for k, v in best.params.items())
            print(f"search: best of {len(trials)} trials ({tally}): trial {best.number}, "
                  f"{self.settings['metric']} = {best.value:.6g} with {params} ({best.user_attrs.get('job')})")  # fmt: skip
        print(f"study summary in {path}")
        return summary

    def _first_failure(self, trials: list) -> str:
        """Why the first trial that gave no value gave none, from its record: its error, or what its record lacks."""
        for trial in sorted(trials, key=lambda t: t.number):
            folder = trial.user_attrs.get("job")
            if trial.state.name == "PRUNED":
                continue
            if not folder:
                return f"trial {trial.number} stopped before its job folder was known"
            record = self._record(Path(folder))
            if (record or {}).get("status") in UNFINISHED:
                return f"trial {trial.number} ({folder}) did not finish: {(record or {}).get('status') or 'no record'}"
            state, _, why = outcome(record, self.settings["metric"])
            if state == "FAIL":
                status = record["status"]
                return f"trial {trial.number} ({folder}){'' if status == 'completed' else f' {status}'}: {why}"
        return "every trial was pruned"


def _quoted(text: str) -> str:
    """A string as one override value, whatever it holds (a path may hold ':' or '=')."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"

"""An Optuna search as the start-up checks see it: its search space, its settings, and the study it continues.

`hydra/sweeper=optuna` (hydra_plugins/transfer_optuna_sweeper) draws each trial's values from the space
that Hydra's sweep syntax writes (choice, range, interval, tag(log, ...)); before anything runs,
config.compose.check_command_line composes a job for every value the search may draw, and the study
already in the sweep folder must have searched the same space. The study lives in SQLite
(`<sweep>/optuna.db` unless `hydra.sweeper.storage` names another), opened here for every reader:
the check, the sweeper (transfer.sweep.search) and a trial's pruning (transfer.training.pruning).

Optuna is an optional install (`pip install -e ".[search]"`), imported only where a study is read.
"""

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from transfer.config.objective import DIRECTION
from transfer.config.preflight import installed
from transfer.errors import TransferError, first_line
from transfer.fmt import count
from transfer.record import job_folders, lookup, read_record

SWEEPER_TARGET = "hydra_plugins.transfer_optuna_sweeper.sweeper.OptunaSweeper"
STORAGE_NAME = "optuna.db"
SQLITE = "sqlite:///"
SAMPLERS = ("tpe", "random")
PRUNERS = ("none", "median", "asha")
DIRECTIONS = {"minimize": "min", "maximize": "max"}
# the study's own settings, read by every job that reports to it (the pruner must be the sweeper's)
STUDY_SETTINGS = "transfer"
INSTALL = "pip install -e '.[search]'"
SPACE = "space"  # the study's user attribute with its search space: key -> {text, distribution}


# ---------------------------------------------------------------- the search space
# ---------------------------------------------------------------- the search space
@dataclass(frozen=True)
class Param:
    """One searched key: Hydra's choice/range/interval as an Optuna distribution (choices, or bounds and a step)."""

    key: str  # as the override writes it, `+` included
    text: str  # what the user wrote, for messages
    kind: str  # categorical, int, float
    choices: tuple = ()
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False

    def values_to_check(self) -> list:
        return list(self.choices) if self.kind == "categorical" else [self.low, self.high]

    def override(self, value) -> str:
        return f"{self.key}={format_value(value)}"

    def distribution(self):
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        if self.kind == "categorical":
            return CategoricalDistribution(self.choices)
        if self.kind == "int":
            return IntDistribution(int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        return FloatDistribution(self.low, self.high, log=self.log, step=self.step)


def format_value(value) -> str:
    """A value as an override writes it: Hydra reads None as the string 'None', so null."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value) if isinstance(value, float) else str(value)


def search_space(params: Mapping | None, overrides: Sequence) -> tuple[dict[str, Param], list[str]]:
    """(the searched keys, the overrides every trial gets), from hydra.sweeper.params and the task overrides.

    `overrides` are Hydra Override objects or strings; a key given twice takes its last value, the
    command line's over the config's. A sweep of one value (choice(8)) is a fixed value.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    lines = [f"{key}={_param_text(value)}" for key, value in flatten(params or {}).items()]
    parser = OverridesParser.create()
    try:
        parsed = parser.parse_overrides(lines)
    except Exception as e:  # Hydra's grammar errors: a multi-line message
        raise TransferError(f"hydra.sweeper.params: cannot parse {lines}: {str(e).splitlines()[0]}") from None
    parsed += [o if not isinstance(o, str) else parser.parse_override(o) for o in overrides]
    by_key = {}
    for o in parsed:
        by_key[o.key_or_group] = o
    space, fixed = {}, []
    for o in by_key.values():
        param = to_param(o) if o.is_sweep_override() else None
        if param is None:
            fixed.append(_fixed_line(o))
        else:
            space[param.key] = param
    return space, fixed


def flatten(node: Mapping, prefix: str = "") -> dict:
    """hydra.sweeper.params as dotted keys: a YAML file writes `optimizer.lr:`, a command line nests it."""
    out = {}
    for key, value in node.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _param_text(value) -> str:
    if isinstance(value, (list, tuple)) or type(value).__name__ == "ListConfig":  # a YAML list: its values
        return f"choice({','.join(format_value(v) for v in value)})"
    return format_value(value) if not isinstance(value, str) else value


def _fixed_line(o) -> str:
    if o.is_sweep_override():  # choice(8): its one value
        (value,) = list(o.sweep_string_iterator())
        return f"{o.get_key_element()}={value}"
    return o.input_line if o.input_line else f"{o.get_key_element()}={o.get_value_element_as_str()}"


def to_param(o) -> Param | None:
    """Hydra's sweep syntax as a distribution, None for a sweep of one value; one-line errors for what Optuna cannot draw."""
    from hydra.core.override_parser.types import Glob, Transformer

    key, value = o.get_key_element(), o.value()
    text = o.input_line or f"{key}={o.get_value_element_as_str()}"
    tags = set(getattr(value, "tags", ()) or ())
    if tags - {"log"}:
        raise TransferError(f"{text}: unknown tag(s) {', '.join(sorted(tags - {'log'}))}; allowed: log")
    if "log" in tags and not o.is_interval_sweep():
        raise TransferError(f"{text}: tag(log, ...) applies to interval(); write tag(log, interval(low, high))")
    if isinstance(value, Glob):
        raise TransferError(
            f"{text}: glob() picks config files for a grid; a search takes choice(), range(), interval()"
        )
    if o.is_choice_sweep() or (o.is_range_sweep() and value.shuffle):
        choices = list(o.sweep_iterator(transformer=Transformer.encode))
        bad = [c for c in choices if not isinstance(c, (str, int, float, bool)) and c is not None]
        if bad:
            raise TransferError(f"{text}: a choice must be a number, a string, true/false or null, not {bad[0]!r}")
        if len(set(map(repr, choices))) < len(choices):
            raise TransferError(f"{text}: a choice is repeated; each must differ")
        return Param(key, text, "categorical", tuple(choices)) if len(choices) > 1 else None
    if o.is_range_sweep():
        values = list(o.sweep_iterator())
        if not values:
            raise TransferError(f"{text}: the range holds no value; allowed range(start, stop, step) with start < stop")
        if len(values) == 1:
            return None
        low, high = min(values), max(values)
        if all(isinstance(v, int) for v in values):
            return Param(key, text, "int", low=low, high=high, step=abs(value.step))
        return Param(key, text, "float", low=float(low), high=float(high), step=abs(float(value.step)))
    if o.is_interval_sweep():
        low, high, log_scale = value.start, value.end, "log" in tags
        if low is None or high is None or not low < high:
            raise TransferError(f"{text}: allowed interval(low, high) with low < high")
        if log_scale and low <= 0:
            raise TransferError(f"{text}: a log scale needs low > 0")
        kind = "int" if isinstance(low, int) and isinstance(high, int) else "float"
        return Param(key, text, kind, low=low, high=high, log=log_scale)
    raise TransferError(f"{text}: a search takes choice(), range() and interval() (tag(log, ...) for a log scale)")


def trial_overrides_to_check(space: dict[str, Param]) -> list[list[str]]:
    """Overrides that give every searched value in at least one trial-like config (n lists, n the most values of a key)."""
    values = {key: param.values_to_check() for key, param in space.items()}
    most = max((len(v) for v in values.values()), default=0)
    return [[space[key].override(v[i % len(v)]) for key, v in values.items()] for i in range(most)]


# ---------------------------------------------------------------- the command line (transfer.config.compose)
PARAMS_PREFIX = "hydra.sweeper.params."


def check_command_line(run, parsed: list, multirun: bool, compose, is_group) -> tuple[list, list[list[str]], list[str]]:
    """A search's command line, checked before anything runs: (the overrides as Hydra must get them,
    override lists whose configs give every value the search may draw, the config groups it searches).

    `run` is the config composed with its hydra node; `compose` composes a job's config with
    one-line errors (transfer.config.compose.compose_config); `is_group(key)` says whether a key is a config group.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if not multirun:
        raise TransferError("hydra/sweeper=optuna runs a search of several trials: add -m (--multirun)")
    check_settings(run.hydra.sweeper, run.objective.select)
    # Hydra refuses a sweep of a hydra.* key: hydra.sweeper.params.K=V goes to it as the task override K=V,
    # which the sweeper reads as the same search parameter
    lines = [line.lstrip("+")[len(PARAMS_PREFIX):] if line.lstrip("+").startswith(PARAMS_PREFIX) else line
             for line in (o.input_line for o in parsed)]  # fmt: skip
    parsed = OverridesParser.create().parse_overrides(lines)
    for o in parsed:
        if o.key_or_group.startswith("search."):
            raise TransferError(f"{o.input_line}: search.* is set by the sweeper for each trial; allowed: leave it out")
    space, fixed = search_space(run.hydra.sweeper.get("params"), [o for o in parsed if not o.is_hydra_override()])
    if not space:
        raise TransferError(
            "hydra/sweeper=optuna has nothing to search; give parameters in Hydra's sweep syntax, "
            "e.g. 'optimizer.lr=tag(log, interval(1e-5, 1e-2))' 'strategy.r=choice(4,8,16)', or hparams_search=..."
        )
    base = [o.input_line for o in parsed if o.is_hydra_override() and not o.is_sweep_override()] + fixed
    check_number_types(space, base, compose, is_group)
    resume = [o.value() for o in parsed if o.key_or_group == "resume"]
    check_study(run.hydra.sweeper, space, Path(str(run.hydra.sweep.dir)), bool(resume and resume[-1] is True))
    jobs = [base + values for values in trial_overrides_to_check(space)]
    return parsed, jobs, [key for key in space if is_group(key)]


def check_number_types(space: dict[str, Param], base: list[str], compose, is_group) -> None:
    """interval() draws fractions: on an integer key every trial would fail, so say how to draw integers."""
    groups = [param.override(param.values_to_check()[0]) for key, param in space.items() if is_group(key)]
    try:
        cfg = compose(base + groups)
    except TransferError:
        return  # the trials' own compositions name what is wrong
    from omegaconf import OmegaConf

    for key, param in space.items():
        current = OmegaConf.select(cfg, key.lstrip("+~"), default=None)
        if param.kind == "float" and isinstance(current, int) and not isinstance(current, bool):
            value = param.text.split("=", 1)[1]
            raise TransferError(
                f"{param.text}: {key.lstrip('+~')} is an integer and {value} draws fractions; write {key}=int({value})"
                if "interval" in value
                else f"{param.text}: {key} is an integer; allowed whole numbers"
            )


# ---------------------------------------------------------------- the sweeper's settings
def is_search(run_cfg) -> bool:
    """Does this composed config (with its hydra node) choose the Optuna sweeper?"""
    sweeper = run_cfg.hydra.get("sweeper") if "hydra" in run_cfg else None
    return sweeper is not None and sweeper.get("_target_") == SWEEPER_TARGET


def check_settings(sweeper, select: str) -> None:
    """The sweeper's settings, before any trial runs: one line naming a bad value and what is allowed."""
    if not installed("optuna"):
        raise TransferError(f"hydra/sweeper=optuna needs Optuna, which is not installed here: {INSTALL}")
    s = sweeper
    for key, value, allowed in (("sampler", s.sampler, SAMPLERS), ("pruner", s.pruner, PRUNERS),
                                ("direction", s.direction, tuple(DIRECTIONS))):  # fmt: skip
        if value not in allowed:
            raise TransferError(f"hydra.sweeper.{key}={value}: allowed {', '.join(allowed)}")
    for key in ("n_trials", "n_jobs", "reduction_factor"):
        if s[key] < (2 if key == "reduction_factor" else 1):
            raise TransferError(
                f"hydra.sweeper.{key}={s[key]} must be at least {2 if key == 'reduction_factor' else 1}"
            )
    for key in ("startup_trials", "pruner_startup_trials", "pruner_warmup_steps"):
        if s[key] < 0:
            raise TransferError(f"hydra.sweeper.{key}={s[key]} must be 0 or more")
    if s.min_resource is not None and s.min_resource < 1:
        raise TransferError(f"hydra.sweeper.min_resource={s.min_resource}: allowed a step count >= 1, or null (auto)")
    parts = str(s.metric).split(".")
    if parts[0] not in ("eval", "train", "params", "memory", "data", "timing") or len(parts) < 2:
        raise TransferError(
            f"hydra.sweeper.metric={s.metric}: allowed a number in the record (metrics.json) by its path, "
            "e.g. eval.final.validation.loss, eval.final.validation.auc, train.best_value"
        )
    wanted = DIRECTIONS[s.direction]
    judged = [(parts[-1], f"hydra.sweeper.metric={s.metric}")]
    if s.pruner != "none":  # the pruner compares reported values in the study's direction
        judged.append((reported_metric(s.metric) or select, "the validation metric the pruner watches"))
    for metric, what in judged:
        if DIRECTION.get(metric, wanted) != wanted:
            better = "lower" if DIRECTION[metric] == "min" else "higher"
            raise TransferError(
                f"hydra.sweeper.direction={s.direction} but {what} ({metric}) is better {better}; "
                f"allowed: direction={'minimize' if better == 'lower' else 'maximize'}"
            )


def reported_metric(metric: str) -> str | None:
    """The validation metric a trial reports while it trains: the objective's own when it names one
    (eval.final.validation.auc -> auc), else None for the run's objective.select."""
    name = metric.split(".")[-1]
    return name if metric.startswith("eval.") and name in DIRECTION else None


# ---------------------------------------------------------------- the study
def check_study(sweeper, space: dict[str, Param], sweep_dir: Path, resume: bool) -> None:
    """An existing study, before anything runs: its file readable, its search space this command's, and on
    resume=true the study there at all. A new study (no file yet) and other storages are the sweeper's to check."""
    url = storage_url(sweeper.storage, sweep_dir)
    path = Path(_where(url)) if url.startswith(SQLITE) else None
    if path is None or not path.is_file():
        return
    with damaged_study(url):
        storage = open_storage(url)
        try:
            study_id = storage.get_study_id_from_name(sweeper.study_name)
        except KeyError:
            study_id = None
        if study_id is None:
            trials = _search_jobs(sweep_dir, sweeper.study_name) if resume else 0
            if trials:  # an emptied or replaced file: a new study would start over beside the old trials' folders
                raise TransferError(
                    f"resume: {sweep_dir} holds {count(trials, 'trial')} of study {sweeper.study_name!r}, and {path} holds "
                    "no such study; allowed: the optuna.db that search wrote, or another hydra.sweep.dir to start afresh"
                )
            return
        import optuna

        study = optuna.load_study(study_name=sweeper.study_name, storage=storage)
        check_same_space(study, space, url)


def _search_jobs(sweep_dir: Path, study_name: str) -> int:
    """How many of a sweep folder's jobs ran as trials of the study (their records say so)."""
    count = 0
    for job in job_folders(sweep_dir) if sweep_dir.is_dir() else []:
        try:
            count += lookup(read_record(job) or {}, "config.search.study") == study_name
        except ValueError:  # an unreadable record is the sweep's to report
            continue
    return count


def check_same_space(study, space: dict[str, Param], url: str) -> None:
    """A study continues in the space it searched: a range or a choice changed since would mix two searches in one
    study (TPE would model both as one). One line naming the parameter and its two definitions."""
    from optuna.distributions import json_to_distribution

    kept = study.user_attrs.get(SPACE)
    if kept is not None:
        then = {key: (v["text"], json_to_distribution(v["distribution"])) for key, v in kept.items()}
    else:  # a study from before the space was kept: its trials' own distributions
        then = {}
        for trial in study.get_trials(deepcopy=False):
            for key, distribution in trial.distributions.items():
                then.setdefault(key, (hydra_text(key, distribution), distribution))
        if not then:
            return
    now = {key: (p.text, p.distribution()) for key, p in space.items()}
    for key in [*then, *(k for k in now if k not in then)]:
        old, new = then.get(key), now.get(key)
        if old is None or new is None or old[1] != new[1]:
            raise TransferError(
                f"study {study.study_name!r} in {url} searched {old[0] if old else f'no {key}'}, this command "
                f"{new[0] if new else f'no {key}'}; allowed: the study's own search space, "
                "or another hydra.sweeper.study_name (or hydra.sweep.dir) for a new study"
            )


def hydra_text(key: str, distribution) -> str:
    """An Optuna distribution in Hydra's sweep syntax, for a study that did not keep what the user wrote."""
    from optuna.distributions import CategoricalDistribution

    if isinstance(distribution, CategoricalDistribution):
        return f"{key}=choice({','.join(format_value(c) for c in distribution.choices)})"
    interval = f"interval({distribution.low}, {distribution.high})"
    if distribution.log:
        return f"{key}=tag(log, {interval})"
    if distribution.step is not None and distribution.step != 1:
        return f"{key}=range({distribution.low}, {distribution.high + distribution.step}, {distribution.step})"
    return f"{key}={interval if type(distribution).__name__ == 'FloatDistribution' else f'int({interval})'}"


@contextlib.contextmanager
def damaged_study(url: str):
    """A study file SQLite cannot read (cut short, overwritten) as one line naming it, not SQLAlchemy's traceback."""
    from optuna.exceptions import StorageInternalError
    from sqlalchemy.exc import SQLAlchemyError

    try:
        yield
    except (SQLAlchemyError, StorageInternalError) as e:  # Optuna's wraps SQLAlchemy's, which wraps SQLite's
        _storages.pop(url, None)
        cause = e.__cause__ if isinstance(e, StorageInternalError) and e.__cause__ is not None else e
        raise TransferError(
            f"{_where(url)} is not a readable Optuna study ({getattr(cause, 'orig', None) or first_line(cause)}); "
            "allowed: the file that search wrote, intact, or another hydra.sweep.dir (or hydra.sweeper.storage) "
            "to start afresh"
        ) from None


def _where(url: str) -> str:
    return url[len(SQLITE) :] if url.startswith(SQLITE) else url


# ---------------------------------------------------------------- Optuna objects
_storages: dict[str, object] = {}


def storage_url(storage: str | None, sweep_dir: Path) -> str:
    """The study's URL as every job reads it: an SQLite file by its absolute path (a job may run elsewhere)."""
    if storage is None:
        return f"sqlite:///{(Path(sweep_dir) / STORAGE_NAME).resolve()}"
    if storage.startswith(SQLITE):
        return f"{SQLITE}{Path(storage[len(SQLITE) :]).expanduser().resolve()}"
    return storage


def open_storage(url: str):
    """One storage per URL and process (the sweeper and its in-process jobs share it)."""
    if url not in _storages:
        from optuna.storages import RDBStorage

        engine = None
        if url.startswith(SQLITE):
            Path(url[len(SQLITE) :]).parent.mkdir(parents=True, exist_ok=True)
            # parallel jobs write to one SQLite file: wait for its lock instead of failing at once
            engine = {"connect_args": {"timeout": 60}}
        with damaged_study(url):
            try:
                _storages[url] = RDBStorage(url, engine_kwargs=engine)
            except RuntimeError as e:  # Optuna's: a study file of another Optuna version's schema
                raise TransferError(f"{_where(url)}: {first_line(e)}") from None
    return _storages[url]

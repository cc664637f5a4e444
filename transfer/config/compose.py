"""Compose a command line's configs as `python -m transfer` would, and check every job before anything runs.

`check_command_line` composes the config of every job a command line would launch
(each combination of a sweep, or every value an Optuna search may draw), so a typo in
the last value of a sweep stops the sweep at start-up, not an hour in. Hydra's and
OmegaConf's multi-line errors are turned into one line that names the bad key or value
and what is allowed; in config files of the user's own (--config-dir, --config-path), the file too. The Plan it returns says where the command writes (config.folders
decides whether it may). Torch-free: it runs in well under a second.
"""

import contextlib
import dataclasses
import functools
import re
from dataclasses import dataclass
from pathlib import Path

from hydra import compose, version
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra._internal.hydra import Hydra
from hydra._internal.utils import compute_search_path_dir, create_config_search_path, get_args_parser
from hydra.core.config_search_path import SearchPathQuery
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import OverrideType
from hydra.errors import MissingConfigException
from hydra.initialize import get_gh_backup, restore_gh_from_backup
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, MissingMandatoryValue, ValidationError

from transfer.config import preflight, schema, search  # noqa: F401 (importing schema registers it with Hydra)
from transfer.config.checks import check_config, torchrun_processes
from transfer.config.folders import check_run_dir, check_sweep_dir
from transfer.config.strategy import RENAMED
from transfer.errors import TransferError, first_line
from transfer.fmt import where

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
TASK_MODULE = "transfer.cli"  # hydra.main's task function's: a relative --config-path is a package path beside it
MAX_SWEEP_JOBS_CHECKED = 512
# Hydra's launcher plugins that install as extras of ours: launcher -> (extra, the modules it brings)
LAUNCHER_EXTRAS = {
    "ray": ("ray", ("hydra_plugins.hydra_ray_launcher", "ray")),
    "ray_aws": ("ray", ("hydra_plugins.hydra_ray_launcher", "ray")),
    "submitit_local": ("slurm", ("hydra_plugins.hydra_submitit_launcher", "submitit")),
    "submitit_slurm": ("slurm", ("hydra_plugins.hydra_submitit_launcher", "submitit")),
}
# launcher settings that are open dicts of keyword arguments (ray.init(), @ray.remote, sbatch options):
# Hydra adds a key there only when written +key=value, so a plain key=value is passed on as ++key=value
OPEN_LAUNCHER_DICTS = ("hydra.launcher.ray.init.", "hydra.launcher.ray.remote.", "hydra.launcher.additional_parameters.")  # fmt: skip


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _package_folder(package: str) -> Path | None:
    """An installed package's folder (pkg://a.b or pkg://a/b, as Hydra reads them); None if there is none."""
    import importlib.util

    try:
        spec = importlib.util.find_spec(package.replace("/", "."))
    except (ModuleNotFoundError, ValueError):  # a parent package that is not there
        return None
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    return Path(folders[0]) if folders else None


@dataclass(frozen=True)
class Source:
    """Where a command line's configs are read, as Hydra reads them: the project's conf/ or a --config-path in its
    place (`primary`), a --config-dir searched after it (`own`), and the top-level config's `name`."""

    primary: Path = CONF_DIR
    own: Path | None = None
    name: str = "config"

    @classmethod
    def of(cls, args) -> "Source":
        """The command line's (Hydra's parsed arguments); a folder it names that is not there is one line."""
        own = Path(args.config_dir).absolute() if args.config_dir else None
        if own is not None and not own.is_dir():
            raise TransferError(f"--config-dir {args.config_dir}: no such folder")
        primary = CONF_DIR
        if args.config_path:
            found = compute_search_path_dir(None, TASK_MODULE, args.config_path)
            primary = _package_folder(found[len("pkg://") :]) if found.startswith("pkg://") else Path(found).absolute()
            if primary is None or not primary.is_dir():
                found = primary or f"no installed package {found[len('pkg://') :]}"
                raise TransferError(f"--config-path {args.config_path}: no such folder ({found})")
        return cls(primary, own, args.config_name or "config")

    @property
    def users(self) -> list[Path]:
        """The folders of the user's own, searched first for a file an error names."""
        return [f for f in (self.own, self.primary) if f is not None and f != CONF_DIR]

    def is_group(self, key: str) -> bool:
        return any((f / key.lstrip("+~")).is_dir() for f in (*self.users, CONF_DIR))

    @contextlib.contextmanager
    def initialized(self):
        """Hydra set up to compose from here, as `python -m transfer` with these flags sets it up."""
        search = create_config_search_path(str(self.primary))
        if self.own is not None:  # after the primary folder, as Hydra's --config-dir
            search.prepend(
                provider="command-line", path=f"file://{self.own}", anchor=SearchPathQuery(provider="schema")
            )
        backup = get_gh_backup()
        try:
            version.setbase("1.3")
            Hydra.create_main_hydra2(task_name="app", config_search_path=search)
            yield
        finally:
            restore_gh_from_backup(backup)

    def explain(self, e: BaseException) -> str:
        """Hydra's error in one line; in a tree of the user's own, naming the file (in_which_file)."""
        if isinstance(e, MissingConfigException) and str(e).startswith("Cannot find primary config"):
            names = sorted({p.stem for f in (*self.users, self.primary) for p in f.glob("*.yaml")})
            return f"--config-name {self.name}: no such config; allowed: {', '.join(names) or 'none'}"
        return in_which_file(e, self) if self.users else explain(e)


PROJECT = Source()


@dataclass
class Plan:
    """What a checked command line will do: where it writes, and its jobs' configs (the first 512)."""

    out_dir: Path
    multirun: bool
    jobs: int
    configs: list[DictConfig]
    # the command line as Hydra should get it (see hydra_overrides)
    argv: list[str]
    # job N of the sweep goes to sub-folder N (Hydra's default hydra.sweep.subdir)
    by_number: bool = True

    @property
    def resume(self):
        return self.configs[0].resume

    def check_folder(self) -> None:
        """May the output folder be written? Call it holding the folder's lock (transfer.sweep.lock)."""
        if self.multirun:
            check_sweep_dir(self.out_dir, self.resume, self.configs if self.by_number else [])
        else:
            check_run_dir(self.out_dir, self.resume, self.configs[0])


def check_command_line(argv: list[str]) -> Plan | None:
    """Raise TransferError if any job of this command line has a bad config; None for Hydra's own flags."""
    args = get_args_parser().parse_args(argv)
    if args.help or args.hydra_help or args.info or args.shell_completion or args.cfg:
        return None
    source = Source.of(args)
    compose_job = functools.partial(compose_config, source=source)
    parser = OverridesParser.create()
    try:
        parsed = parser.parse_overrides(args.overrides)
    except Exception as e:  # Hydra's grammar errors
        raise TransferError(f"cannot parse overrides {args.overrides}: {first_line(e)}") from None
    for o in parsed:
        if "_target_" in o.input_line:
            raise TransferError(
                f"override {o.input_line!r} sets _target_, which would call any Python function; "
                "allowed: config group choices and values of known keys"
            )
        if o.key_or_group == "hydra/launcher" and isinstance(o.value(), str):
            check_launcher(o.value())
    opened = {o.input_line: f"++{o.input_line}" for o in parsed if _adds_launcher_key(o)}
    if opened:
        argv = [opened.get(a, a) for a in argv]
        args.overrides = [opened.get(a, a) for a in args.overrides]
        parsed = parser.parse_overrides(args.overrides)
    # One composition for what Hydra itself reads (output folders, a preset's sweep params).
    # It takes group choices and hydra settings only: a key of a group the command line sweeps
    # (strategy=lora,dora strategy.r=8) is judged in each job, against that job's option.
    preliminary = [o.input_line for o in parsed if not o.is_sweep_override() and _is_group_or_hydra(o, source)]
    run = compose_job(preliminary, with_hydra=True)
    check_ray_gpus(run)
    jobs = [list(args.overrides)]
    swept = []
    searching = search.is_search(run)
    if searching:  # hydra/sweeper=optuna draws the trials' values as it runs: every value it may draw is checked
        parsed, jobs, swept = search.check_command_line(run, parsed, args.multirun, compose_job, source.is_group)
    elif args.multirun:  # sweeps set in a config (hydra.sweeper.params) count as much as the command line's
        given = {o.get_key_element() for o in parsed}
        params = {k: v for k, v in (run.hydra.sweeper.get("params") or {}).items() if k not in given}
        overrides = parser.parse_overrides([f"{k}={v}" for k, v in params.items()] + args.overrides)
        jobs = BasicSweeper.split_arguments(overrides, None)[0]
        swept = [o.key_or_group for o in overrides if o.is_sweep_override() and _is_group_or_hydra(o, source)]
        compose_job = functools.partial(_compose_swept, params=params, run=run, source=source)
    configs = [compose_job(overrides) for overrides in jobs[:MAX_SWEEP_JOBS_CHECKED]]
    processes = processes_per_job(run)
    for cfg in configs:
        check_config(cfg, processes)
    # the folder is pinned: a ${now:...} in its name must not move on to the next second before Hydra reads it
    key, out_dir = ("hydra.sweep.dir", run.hydra.sweep.dir) if args.multirun else ("hydra.run.dir", run.hydra.run.dir)
    pinned = "'" + str(out_dir).replace("\\", "\\\\").replace("'", "\\'") + "'"
    argv = [a for a in argv if a not in args.overrides] + hydra_overrides(parsed, swept) + [f"{key}={pinned}"]
    if args.multirun:
        by_number = OmegaConf.to_container(run.hydra.sweep, resolve=False).get("subdir") == "${hydra.job.num}"
        if searching:  # a trial's folder holds whatever values the study drew for it: each job checks itself
            return Plan(Path(out_dir), True, run.hydra.sweeper.n_trials, configs, argv, by_number=False)
        return Plan(Path(out_dir), True, len(jobs), configs, argv, by_number)
    return Plan(Path(out_dir), False, 1, configs, argv)


def hydra_overrides(parsed, swept_groups: list[str]) -> list[str]:
    """The overrides as Hydra must get them to run what check_command_line checked.

    Hydra composes a sweep-level config from the overrides that sweep nothing, with each swept
    group at its default: a key of a swept group (strategy=lora,dora strategy.r=8) fails there,
    against the default option. Every job was checked against its own option already, so such
    a key goes to Hydra as a sweep of one value (strategy.r=choice(8)), applied in each job.
    """
    prefixes = tuple(group.replace("/", ".") + "." for group in swept_groups)
    return [
        f"{o.get_key_element()}=choice({o.get_value_element_as_str()})"
        if not o.is_sweep_override() and o.key_or_group.startswith(prefixes) and not o.is_delete()
        else o.input_line
        for o in parsed
    ]


def check_launcher(name: str) -> None:
    """A launcher whose plugin is not installed is refused in one line, before anything runs."""
    missing = missing_launcher(name)
    if missing:
        raise TransferError(missing)


def missing_launcher(name: str) -> str | None:
    """The line naming the extra that brings launcher `name`, if it is one of those and not installed."""
    if name not in LAUNCHER_EXTRAS:
        return None  # Hydra's own, or unknown: composing the config names the ones there are
    extra, modules = LAUNCHER_EXTRAS[name]
    if all(preflight.installed(m) for m in modules):
        return None
    return f'hydra/launcher={name} needs the {extra} extra: pip install -e ".[{extra}]"'


def check_ray_gpus(run: DictConfig) -> None:
    """Ray's local cluster queues a job that asks for a GPU until one appears: on a machine without one, forever."""
    ray = run.hydra.launcher.get("ray")
    init = (ray or {}).get("init", {})
    if not ray or init.get("address") is not None or init.get("num_gpus") is not None:
        return  # not Ray, a cluster elsewhere with GPUs of its own, or GPUs declared to Ray by hand
    gpus = ray.get("remote", {}).get("num_gpus") or 0
    if gpus > 0 and preflight.cuda_available() is False:
        raise TransferError(
            f"hydra.launcher.ray.remote.num_gpus={gpus} but this machine has no CUDA GPU, and Ray's local cluster "
            "would queue every job forever; allowed here: 0, or hydra.launcher.ray.init.address=<a cluster with GPUs>"
        )


def _adds_launcher_key(o) -> bool:
    return o.type == OverrideType.CHANGE and o.key_or_group.startswith(OPEN_LAUNCHER_DICTS)


def _is_group_or_hydra(o, source: Source) -> bool:
    key = o.key_or_group
    return key.startswith("hydra") or source.is_group(key)


def compose_config(overrides: list[str], with_hydra: bool = False, source: Source = PROJECT) -> DictConfig:
    """Compose the run config as `python -m transfer` would, with one-line errors; every key must be in the schema."""
    with source.initialized():
        try:
            cfg = compose(source.name, overrides=list(overrides), return_hydra_config=with_hydra)
        except Exception as e:
            raise TransferError(source.explain(e)) from None
    check_keys(cfg)
    return cfg


def _compose_swept(overrides: list[str], params: dict, run: DictConfig, source: Source) -> DictConfig:
    """A job of a sweep that a config's hydra.sweeper.params makes: a bad value of those names the file it is in."""
    try:
        return compose_config(overrides, source=source)
    except TransferError as e:
        job = dict(o.split("=", 1) for o in overrides if "=" in o)
        bad = next((k for k in params if k in str(e) and f"'{job.get(k)}'" in str(e)), None)
        files = [*_chosen_files(run, source)] if bad else []
        found = next((f for f in files if bad in (_loaded(f).get("hydra", {}).get("sweeper", {}).get("params") or {})),
                     None)  # fmt: skip
        if found is None:
            raise
        raise TransferError(f"{where(found)}: hydra.sweeper.params {bad}={params[bad]}: {e}") from None


def _chosen_files(run: DictConfig, source: Source):
    """The files of the options a composed config chose, and its top-level config's: the user's first."""
    choices = [f"{g}/{o}" for g, o in run.hydra.runtime.choices.items() if isinstance(o, str)]
    for name in (*choices, source.name):
        yield from (f / f"{name}.yaml" for f in (*source.users, CONF_DIR) if (f / f"{name}.yaml").is_file())


def _loaded(path: Path) -> dict:
    try:
        return OmegaConf.to_container(OmegaConf.load(path)) or {}
    except Exception:  # a file Hydra read already; one it could not is reported where it read it
        return {}


def in_which_file(e: Exception, source: Source) -> str:
    """Hydra's error while composing a config tree of the user's own, as one line: the file it names ('In
    experiment/x'), the key and what is allowed there, or the unknown option, the file of the user's own whose defaults
    chose it, and the options of every folder."""
    chain = [e]
    while (chain[-1].__cause__ or chain[-1].__context__) is not None and len(chain) < 10:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    keyed = next((x for x in chain if getattr(x, "full_key", None)), None)
    missing = re.search(r"Could not find '(.+)/([^/']+)'\n\nAvailable options in '[^']+':\n((?:\t.*\n?)+)", str(e))
    if isinstance(keyed, (ConfigAttributeError, ConfigKeyError)):
        line = unknown_key(keyed.full_key, keyed.object_type)
    elif keyed is not None:
        line = f"{keyed.full_key}: {first_line(keyed)}"
    elif missing:  # Hydra says which config's defaults chose it, not where the choice was written
        line = f"unknown {missing[1]} '{missing[2]}'; allowed: {', '.join(missing[3].split())}"
        chose = next((f for u in source.users for f in sorted(u.rglob("*.yaml")) if _chooses(f, *missing.groups()[:2])),
                     None)  # fmt: skip
        return f"{where(chose)}: {line}" if chose else line
    else:
        line = explain(e)
    named = re.match(r"In '([^']+)'", str(e))
    files = [f / f"{named[1]}.yaml" for f in source.users] if named else []
    found = next((f for f in files if f.is_file()), None)
    return f"{where(found)}: {line.removeprefix(named[0] + ': ')}" if found else line


def _chooses(path: Path, group: str, option: str) -> bool:
    """Whether a config file's defaults list chooses `option` of `group` (`override /strategy: lorra`)."""
    for entry in _loaded(path).get("defaults") or []:
        for key, value in entry.items() if isinstance(entry, dict) else []:
            if key.split()[-1].lstrip("/") == group and option in (value if isinstance(value, list) else [value]):
                return True
    return False


def check_keys(node: DictConfig, prefix: str = "") -> None:
    """Every key is one the schema knows: `+key=value` adds keys Hydra does not check."""
    object_type = OmegaConf.get_type(node)
    allowed = _fields(object_type)
    for key in node.keys():
        if prefix == "" and key == "hydra":
            continue
        if allowed and key not in allowed:
            raise TransferError(unknown_key(f"{prefix}{key}", object_type))
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_missing() and not child._is_none():
            check_keys(child, f"{prefix}{key}.")


def explain(e: BaseException) -> str:
    """One line naming the bad key or value and what is allowed."""
    if isinstance(e, MissingConfigException):
        # "find" for one option, "load" for one of a list (eval/probes=[...], eval/benchmarks=[...])
        m = re.search(r"Could not (?:find|load) '(.+)/([^/']+)'", str(e))
        if m and (CONF_DIR / m.group(1)).is_dir() and m.group(2) not in group_options(m.group(1)):
            group, value = m.groups()
            return f"unknown {group} '{value}'; allowed: {', '.join(group_options(group))}"
        if m and m.group(1) == "hydra/launcher" and missing_launcher(m.group(2)):  # chosen in a config file
            return missing_launcher(m.group(2))
        options = re.search(r"Available options in '[^']+':\n((?:\t.*\n?)+)", str(e))
        if m and options:  # Hydra's own groups (hydra/launcher, hydra/sweeper, ...)
            return f"unknown {m.group(1)} '{m.group(2)}'; allowed: {', '.join(options.group(1).split())}"
        return first_line(e)
    cause = e.__cause__ or e
    key = getattr(cause, "full_key", None)
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and key:
        return unknown_key(key, getattr(cause, "object_type", None))
    if isinstance(cause, (ValidationError, MissingMandatoryValue)) and key:
        return f"{key}: {first_line(cause)}"
    return first_line(e)


def unknown_key(key: str, object_type) -> str:
    *parents, name = key.split(".")
    renamed = RENAMED.get((object_type, name))
    if renamed:
        new = ".".join([*parents, renamed])
        return f"{key} was renamed: write {new}= instead (it names what the number counts)"
    allowed = _fields(object_type)
    hint = f"; allowed keys there: {', '.join(allowed)}" if allowed else ""
    return f"unknown key '{key}'{hint}"


def _fields(object_type) -> list[str]:
    return [f.name for f in dataclasses.fields(object_type)] if dataclasses.is_dataclass(object_type) else []


def processes_per_job(run: DictConfig) -> int:
    """How many processes run each job of a command: torchrun's, or a submitit job's tasks (`run`: the config with
    its hydra node; hydra.launcher.tasks_per_node x nodes)."""
    launcher = run.hydra.get("launcher") or {}
    tasks = int(launcher.get("tasks_per_node") or 1) * int(launcher.get("nodes") or 1)
    return max(torchrun_processes(), tasks)

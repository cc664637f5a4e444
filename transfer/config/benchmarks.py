"""Standard benchmarks scored before and after training through lm-evaluation-harness (eval.benchmarks): their
settings and checks.

Torch-free and lm_eval-free, like the whole of config/: the task definitions (lm-evaluation-harness YAML, shipped in
transfer/evaluation/tasks/) are read here as plain YAML, for their names and the files they read, so that a bad
name, limit or data folder is one line at start-up; evaluation/benchmarks.py runs them.
"""

from dataclasses import dataclass
from pathlib import Path

import yaml
from omegaconf import MISSING, DictConfig

from transfer.errors import TransferError

TASKS_DIR = Path(__file__).resolve().parents[1] / "evaluation" / "tasks"


@dataclass
class BenchmarkConfig:
    """One benchmark (the group eval/benchmarks, a list: eval/benchmarks=[arc_easy,piqa]); record and tables call it
    bench_<name>."""

    # The harness's task (or group: MMLU's subjects) to run, by the name its YAML gives it: transfer/evaluation/tasks/
    # or tasks_dir.
    task: str = MISSING
    # Score the first N items only (per subject of a group, as the harness's limit is), the same ones before and
    # after training; null = all of them.
    limit: int | None = None
    # Solved examples before each question; null = the task's own (0 unless its YAML sets one).
    num_fewshot: int | None = None
    # The folder the shipped tasks read their JSONL files from (each task's data_files are relative to it).
    data: str = "${oc.env:TRANSFER_SHARED,../shared}/datasets/benchmarks"
    # A folder of your own task YAMLs (lm-evaluation-harness's format), searched with the shipped ones.
    tasks_dir: str | None = None


class _Tags(yaml.SafeLoader):
    """YAML with lm-evaluation-harness's `!function` tags, read as the function's dotted name."""


_Tags.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))


def task_files(tasks_dir: str | None = None) -> dict[str, dict]:
    """{task or group name: its YAML (includes not followed)} of the shipped tasks and those in `tasks_dir`."""
    found = {}
    for folder in [TASKS_DIR, *([Path(tasks_dir).expanduser()] if tasks_dir else [])]:
        for path in sorted(folder.rglob("*.yaml")):
            try:
                spec = yaml.load(path.read_text(), Loader=_Tags)  # noqa: S506 (a SafeLoader, one tag added)
            except (OSError, yaml.YAMLError) as e:
                raise TransferError(f"{path}: not a readable task YAML ({str(e).splitlines()[0]})") from None
            for key in ("group", "task"):
                if isinstance(spec, dict) and isinstance(spec.get(key), str):
                    found[spec[key]] = spec
                    break
    return found


def data_files(spec: dict, found: dict[str, dict]) -> list[str]:
    """The files, relative to the data folder, that a shipped task (each of a group's tasks) reads."""
    if "group" in spec:
        return [f for name in spec.get("task") or [] if name in found for f in data_files(found[name], found)]
    if spec.get("custom_dataset") != "transfer.evaluation.tasks.load":
        return []  # your own task reads what its YAML names, where it names it
    return list(((spec.get("dataset_kwargs") or {}).get("data_files") or {}).values())


def check_benchmarks(benchmarks: DictConfig) -> None:
    """Each benchmark names a known task, a limit of at least one item, a few-shot count of none or more, and a data
    folder that holds its files."""
    for name, bench in benchmarks.items():
        where = f"eval.benchmarks.{name}"
        if bench.limit is not None and bench.limit < 1:
            raise TransferError(f"{where}.limit={bench.limit}: allowed a number of items >= 1, or null for all")
        if bench.num_fewshot is not None and bench.num_fewshot < 0:
            raise TransferError(f"{where}.num_fewshot={bench.num_fewshot}: allowed 0 or more, or null for the task's")
        if bench.tasks_dir is not None and not Path(bench.tasks_dir).expanduser().is_dir():
            raise TransferError(
                f"{where}.tasks_dir={bench.tasks_dir!r} is not a folder; allowed: a folder of task YAMLs"
            )
        found = task_files(bench.tasks_dir)
        if bench.task not in found:
            raise TransferError(f"{where}.task={bench.task!r} is not a task; allowed: {', '.join(_listed(found))}")
        folder = Path(bench.data).expanduser()
        for file in data_files(found[bench.task], found):
            if not (folder / file).is_file():
                raise TransferError(
                    f"{where}.data={bench.data!r} holds no {file}; allowed: a folder laid out like "
                    "../shared/datasets/benchmarks (its README.txt)"
                )


def _listed(found: dict[str, dict]) -> list[str]:
    """Task names people pick: groups and the tasks no group holds (not MMLU's 57 subjects one by one)."""
    grouped = {t for spec in found.values() if "group" in spec for t in spec.get("task") or []}
    return sorted(name for name in found if name not in grouped)

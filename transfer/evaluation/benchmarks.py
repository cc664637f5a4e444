"""Standard benchmarks before and after training, through lm-evaluation-harness (eval.benchmarks).

The harness is the engine: its HFLM wraps the model in memory (no export), its task definitions (the YAML files of
evaluation/tasks/: the harness's own prompts and metrics, reading the local JSONL files) make the requests, and its
evaluate() scores them: acc, acc_norm where the task has it, and their standard errors, as any paper's numbers.
Nothing of that is done again here. What this module adds is what a before-and-after comparison needs:

- the same items before and after: `limit` is the first N of each task, and the baseline keeps each item's result;
- the change in points and ITS standard error, paired: the items are the same, so the change's error is that of the
  mean of the per-item differences (the harness's own mean_stderr over them), far smaller than the two accuracies'
  errors combined as if independent;
- the record: the harness's version, each benchmark's task hash (the harness's task_hashes: every item's document,
  prompt and target) and config hash (the task's config as the harness dumps it, less where this machine keeps the
  files), its items, few-shot count and limit.

Several processes (torchrun): every process scores every item, inside the wrapper's forward (FSDP2 gathers each
block's weights in every process at once; a benchmark on rank 0 alone would wait for the others forever); the results
are the same in each, rank 0's is written. The work is not split: a benchmark costs as much in each process.
"""

import copy
import hashlib
import json
import logging
import time

from transfer.config.benchmarks import TASKS_DIR
from transfer.errors import TransferError

PREFIX = "bench_"  # a benchmark's name in eval.baseline / eval.final, and its columns: bench_arc_easy_acc_after
METRICS = ("acc", "acc_norm")
log = logging.getLogger(__name__)


def run(subject, when: str, before: dict | None = None) -> dict:
    """{bench_<name>: its metrics} for every benchmark of eval.benchmarks; after training with the paired change."""
    from transfer.fmt import describe_metrics, duration

    results = {}
    for name, bench in subject.cfg.eval.benchmarks.items():
        clock = time.perf_counter()
        found = subject.plan.evaluate(
            lambda size: subject.trainee.use(harness, subject.tokenizer, bench, size, subject.hardware),  # noqa: B023
            f"{when} benchmark {name}",
        )
        result = summary(found, bench)
        if before is not None:
            result.update(paired_change(before[PREFIX + name], result, name))
        results[PREFIX + name] = result
        log.info(
            "%s benchmark %s: %s (%s)", when, name, describe_metrics(result), duration(time.perf_counter() - clock)
        )
    return results


def task_manager(bench):
    """The harness's TaskManager over the shipped task definitions (and the benchmark's own folder), reading the
    data from `bench.data`."""
    from lm_eval.tasks import TaskManager

    folders = [str(TASKS_DIR), *([bench.tasks_dir] if bench.tasks_dir else [])]
    # the harness's own tasks are not searched: thousands of YAML files, and names that read the hub
    return TaskManager(include_path=folders, include_defaults=False, metadata={"benchmark_data": str(bench.data)})


def harness(model, tokenizer, bench, batch_size: int, hardware) -> dict:
    """lm-evaluation-harness's evaluate() of `bench` on the model in memory, every item logged; the model's training
    mode as it was."""
    from lm_eval import evaluator
    from lm_eval.models.huggingface import HFLM

    # the harness says, for every task, that the data comes from a custom reader, and that a model object leaves some
    # of its options unused: both are this module's choices
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    was_training = model.training
    try:
        # a copy: HFLM gives a tokenizer without one a padding token, which the run's own must not get
        lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=batch_size)
        loaded = task_manager(bench).load([bench.task])
        for task in loaded["tasks"].values():  # as simple_evaluate sets them
            own = task.get_config("num_fewshot")
            task.set_config(key="num_fewshot", value=bench.num_fewshot if bench.num_fewshot is not None else own or 0)
            task.set_fewshot_seed(seed=evaluator.DEFAULT_OTHER_SEED)
        with hardware.autocast():
            return evaluator.evaluate(lm=lm, task_dict=loaded, limit=bench.limit, log_samples=True)
    except AssertionError:
        if any(len(lm.tok_encode(r.args[1])) > lm.max_length for t in loaded["tasks"].values() for r in t.instances):
            raise TransferError(
                f"benchmark task {bench.task}: an answer is longer than the model's context ({lm.max_length} tokens), "
                "which lm-evaluation-harness cannot score; allowed: a limit before that item, or a longer-context model"
            ) from None
        raise
    finally:
        model.train(was_training)


def summary(found: dict, bench) -> dict:
    """The benchmark's metrics as the harness aggregated them (a group's over its tasks), each item's result, and what
    says which items and definitions were scored."""
    from lm_eval import utils
    from lm_eval.api.metrics import mean

    top = found["results"][bench.task]
    result = {}
    for metric in METRICS:
        if f"{metric},none" in top:
            result[metric] = float(top[f"{metric},none"])
            result[f"{metric}_stderr"] = float(top[f"{metric}_stderr,none"])
    tasks = sorted(found["samples"])
    samples = {t: sorted(found["samples"][t], key=lambda s: s["doc_id"]) for t in tasks}
    result["per_item"] = {m: [int(s[m]) for t in tasks for s in samples[t]] for m in METRICS if m in result}
    configs = {t: {**found["configs"][t], "metadata": _portable(found["configs"][t].get("metadata"))} for t in tasks}
    result["harness"] = {
        "version": _version(),
        "task": bench.task,
        "items": sum(len(samples[t]) for t in tasks),
        "limit": bench.limit,
        "num_fewshot": sorted({found["configs"][t]["num_fewshot"] for t in tasks}),
        # the harness's task_hashes (EvaluationTracker): each item's document, prompt and target; a group's tasks in
        # order
        "task_hash": utils.hash_string(
            "".join(
                utils.hash_string("".join(s["doc_hash"] + s["prompt_hash"] + s["target_hash"] for s in samples[t]))
                for t in tasks
            )
        ),  # fmt: skip
        "config_hash": utils.hash_string(json.dumps(configs, sort_keys=True, default=str)),
    }
    assert all(abs(mean(result["per_item"][m]) - result[m]) < 1e-9 for m in result["per_item"]), "items vs aggregate"
    return result


def paired_change(before: dict, after: dict, name: str) -> dict:
    """<metric>_change_points and its paired standard error, from the per-item differences (after - before): the
    harness's mean_stderr of them, in points (x 100)."""
    from lm_eval.api.metrics import mean_stderr

    if before["harness"]["task_hash"] != after["harness"]["task_hash"]:
        log.warning("benchmark %s scored other items or prompts after training than before (task hash %s, then %s): "
                    "no paired change", name, before["harness"]["task_hash"], after["harness"]["task_hash"])  # fmt: skip
        return {}
    change = {}
    for metric, items in after["per_item"].items():
        differences = [a - b for a, b in zip(items, before["per_item"][metric], strict=True)]
        change[f"{metric}_change_points"] = 100.0 * (after[metric] - before[metric])
        change[f"{metric}_change_points_stderr"] = 100.0 * float(mean_stderr(differences)) if len(items) > 1 else None
    return change


def settings(subject) -> dict:
    """What the untrained model's benchmark results depend on besides the model (evaluation.Evaluator.key): the
    benchmarks' settings, the task definitions and data files as they are now (their bytes), the harness's version."""
    from pathlib import Path

    from omegaconf import OmegaConf

    from transfer.config.benchmarks import data_files, task_files

    benchmarks = OmegaConf.to_container(subject.cfg.eval.benchmarks, resolve=True)
    files = {}
    for name, bench in benchmarks.items():
        folders = [TASKS_DIR, *([Path(bench["tasks_dir"]).expanduser()] if bench["tasks_dir"] else [])]
        found = task_files(bench["tasks_dir"])
        data = Path(bench["data"]).expanduser()
        read = [
            *(p for f in folders for p in sorted(f.rglob("*.yaml"))),
            *(data / f for f in data_files(found[bench["task"]], found)),
        ]
        files[name] = {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in read}
    return {"benchmarks": benchmarks, "files": files, "harness": _version()}


def _portable(metadata: dict | None) -> dict:
    """A task config's metadata less where this machine keeps the files and the YAML."""
    return {k: v for k, v in (metadata or {}).items() if k not in ("benchmark_data", "config_source")}


def _version() -> str:
    from importlib.metadata import version

    return version("lm_eval")

"""What a run is judged on, before training and after it: the evaluators, by name (`EVALUATORS`).

Today's: the objective's own metrics on validation and test; perplexity on the forgetting probes
(perplexity.py); greedy samples (samples.py); layer-wise diagnostics (diagnostics.py); choices.py
scores the choices of the sft objective. An evaluator that scores gives {split or task: {metric: value}},
which the record keeps as eval.baseline and eval.final and compares as eval.change (the tables find its
columns by themselves); another keeps its final result under its own name in the record.

Standard benchmarks through lm-evaluation-harness (benchmarks.py, eval.benchmarks) score as bench_<name>.
A new evaluator is its module, an entry in `EVALUATORS` and its settings in the config (what it reads from cfg; with
none asked for, it gives {}). Its baseline is a sweep cache entry of its own, keyed on what it says it depends on (the
splits it `reads`, its settings as `key` gives them): one evaluator's settings changed, the others' are still found.

Which way each metric improves is config.objective.DIRECTION; the descriptive numbers that have none, DESCRIPTIVE.
"""

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

EVAL_SPLITS = ("validation", "test")  # the objective's own, where the data has them
log = logging.getLogger(__name__)


def my_batches(seqs, batch_size: int, pad_id: int, desc: str):
    """(number, batch) of this process's share of a split's evaluation batches (all of them in one process),
    shown as they go (my_shown_batches); number None: a batch run again uncounted (distributed.my_batches)."""
    from transfer.data.sequences import evaluation_batches

    count = -(-len(seqs) // batch_size)
    return my_shown_batches(evaluation_batches(seqs, batch_size, pad_id), count, desc)


def my_shown_batches(batches, count: int, desc: str):
    """(number, batch) of this process's share of `count` `batches` (distributed.my_batches), with a progress bar on
    rank 0, or where none shows (a log file, a console that is no terminal) a log line every 30 s: an evaluation of a
    0.5B model on a CPU takes minutes."""
    from tqdm.auto import tqdm

    from transfer.fmt import progress_lines
    from transfer.training import distributed

    mine = distributed.my_batches(batches, count)
    bar = tqdm(mine, total=distributed.share(count), desc=desc, leave=False, unit="batch",
               disable=distributed.bars_off())  # fmt: skip
    return progress_lines(bar, bar.total, desc, "batches", log) if bar.disable and distributed.is_main() else bar


@dataclass
class Subject:
    """The model an evaluator judges, and what it judges it with."""

    model: Any
    trainee: Any  # the model as the processes share it (transfer.training.distributed.Trainee)
    objective: Any
    splits: dict
    tokenizer: Any
    sample_inputs: list  # the objective's prompts for samples (objective.sample_inputs)
    cfg: Any
    hardware: Any
    plan: Any  # batch sizes, and what out of memory changes (transfer.training.oom.MemoryPlan)


@dataclass(frozen=True)
class Evaluator:
    # run(subject, "baseline" or "final", its own baseline result at the final, else None) -> its result
    run: Callable[[Subject, str, Any], Any]
    scores: bool = True  # {name: {metric: value}}: the record's eval.<when>; else the record's <evaluator name>
    # its baseline may come from a sweep's cache, an entry of its own (entry_key): a function of the model's function,
    # the objective, the hardware, the tokens of the splits it `reads` (None: every split but train, for one that does
    # not say) and what `key` gives (its own settings). One that reads no split and has no settings (no key, or None
    # from it) was asked for nothing: its baseline is computed, not kept.
    cached: bool = True
    key: Callable[[Subject], Any] | None = None
    reads: Callable[[Subject], list[str]] | None = None
    batched: bool = True  # it scores in batches of eval_batch_size, which then enters its key
    tokenizes: bool = False  # it tokenizes or decodes text itself: the tokenizer's definition enters its key
    # its result depends on the objective and the dataset, whose settings and the model's function on the objective's
    # splits enter its key; else (the benchmarks: their own data and prompts) on neither, and the model enters as its
    # function on fixed tokens (cache.model_function): found by a job of another objective or dataset
    of_the_data: bool = True


def at_baseline(subject: Subject, common: dict | None) -> tuple[dict, list[str]]:
    """Every evaluator's result on the untrained model, by name; and the names of those that came from the cache.
    common: cache_key(subject), or None where there is no cache (all computed here)."""
    from transfer import cache

    results, kept = {}, []
    for name, e in EVALUATORS.items():
        key = entry_key(subject, e, common) if e.cached and common is not None else None
        if key is None:
            results[name] = e.run(subject, "baseline", None)
            continue
        results[name], found = cache.baseline(key, lambda e=e: e.run(subject, "baseline", None), name)
        kept += [name] if found else []
    return results, kept


def at_final(subject: Subject, baseline: dict) -> dict:
    """Every evaluator's result on the trained model, by name, given its baseline results."""
    return {name: e.run(subject, "final", baseline.get(name)) for name, e in EVALUATORS.items()}


def scores(results: dict) -> dict:
    """{split: metrics} of the evaluators that score, in their order: the record's eval.baseline or eval.final."""
    return {split: m for name, e in EVALUATORS.items() if e.scores for split, m in results.get(name, {}).items()}


def others(results: dict) -> dict:
    """The results of the evaluators that do not score, by name: each a key of the record."""
    return {name: results[name] for name, e in EVALUATORS.items() if not e.scores and name in results}


def changes(baseline: dict, final: dict) -> tuple[dict, dict]:
    """The record's eval.change_pct (of perplexity, where a split has one) and eval.change (of every metric but the
    descriptive ones, config.objective.DESCRIPTIVE: a constant answer's accuracy, the spread of the answers)."""
    from transfer.config.objective import DESCRIPTIVE

    pct = {name: 100.0 * (final[name]["perplexity"] - baseline[name]["perplexity"]) / baseline[name]["perplexity"]
           for name in final if "perplexity" in final[name]}  # fmt: skip
    change = {
        name: {k: final[name][k] - v for k, v in baseline[name].items() if isinstance(v, float)
               and isinstance(final[name].get(k), float) and k not in DESCRIPTIVE}
        for name in final
    }  # fmt: skip
    return pct, change


def cache_key(subject: Subject) -> dict:
    """What the untrained model's cached results depend on, for entry_key to take each evaluator's part of: the model
    as what it computes on each split and on fixed tokens, each split's tokens, the objective as its settings and what
    it made of the data (its template, the choices as scored, its reference), the tokenizer, the hardware, the code
    and libraries."""
    from omegaconf import OmegaConf

    from transfer import cache

    cfg, hardware = subject.cfg, subject.hardware
    return {
        "function": subject.trainee.use(cache.model_function, subject.splits, hardware, len(subject.tokenizer)),
        "splits": {name: cache.digest(*s.content()) for name, s in subject.splits.items() if name != "train"},
        "objective": OmegaConf.to_container(cfg.objective, resolve=True, enum_to_str=True),
        "objective_as_built": subject.objective.baseline_key(),
        "choices": list(cfg.dataset.get("choices") or []),
        "tokenizer": cache.tokenizer_digest(subject.tokenizer),
        "eval_batch_size": cfg.eval_batch_size,
        "hardware": {
            "device": hardware.device.type,
            "precision": hardware.precision,
            "loss_chunk_tokens": cfg.hardware.loss_chunk_tokens,
        },
        "environment": cache.environment(),
    }


_OF_THE_DATA = ("objective", "objective_as_built", "choices")  # what only an evaluator of_the_data depends on


def entry_key(subject: Subject, evaluator: Evaluator, common: dict) -> dict | None:
    """The key of one evaluator's cached baseline: of `common` (cache_key's), what it depends on: the tokens of the
    splits it reads, the model's function on those and, for an evaluator of_the_data, on the objective's splits (so
    that one that reads none still knows the model), else on fixed tokens; the objective's settings where it is
    of_the_data, the tokenizer where it tokenizes, eval_batch_size where it batches;
    and its own settings. None: it was asked for nothing, or it tokenizes with a tokenizer that has no definition to
    key on (cache.tokenizer_digest), as tokens are not kept then either."""
    from transfer.cache import FIXED

    reads = evaluator.reads(subject) if evaluator.reads else list(common["splits"])
    settings = evaluator.key(subject) if evaluator.key else None
    if (not reads and settings is None) or (evaluator.tokenizes and common["tokenizer"] is None):
        return None
    on = {*reads, *_objective_splits(subject)} if evaluator.of_the_data else {*reads, FIXED}
    wanted = {"eval_batch_size": evaluator.batched, "tokenizer": evaluator.tokenizes,
              **dict.fromkeys(_OF_THE_DATA, evaluator.of_the_data)}  # fmt: skip
    return {
        **{k: v for k, v in common.items() if wanted.get(k, True)},
        "function": {name: f for name, f in common["function"].items() if name in on},
        "splits": {name: common["splits"][name] for name in reads},
        "settings": settings,
    }


def _score(subject: Subject, when: str, names: list[str], evaluate) -> dict:
    """evaluate(model, split, batch_size, hardware, desc) on each split named, a log line each; out of memory,
    tried again as hardware.on_oom says."""
    from transfer.fmt import describe_metrics, duration

    results = {}
    for name in names:
        clock, desc, split = time.perf_counter(), f"{when} {name}", subject.splits[name]
        results[name] = subject.plan.evaluate(
            lambda size: subject.trainee.use(evaluate, split, size, subject.hardware, desc),  # noqa: B023
            f"{desc} evaluation",
        )
        log.info("%s %s: %s (%s)", when, name, describe_metrics(results[name]), duration(time.perf_counter() - clock))
    return results


def _objective_splits(subject: Subject) -> list[str]:
    return [n for n in EVAL_SPLITS if n in subject.splits]


def _objective(subject: Subject, when: str, before=None) -> dict:
    """Validation and test, by the objective's own evaluator."""
    return _score(subject, when, _objective_splits(subject), subject.objective.evaluate)


def _probe_splits(subject: Subject) -> list[str]:
    from transfer.data.probes import PREFIX

    return [n for n in subject.splits if n.startswith(PREFIX)]


def _probes(subject: Subject, when: str, before=None) -> dict:
    """The forgetting probes (ref_<name>): perplexity, whatever the objective."""
    from transfer.evaluation.perplexity import perplexity

    def evaluate(model, split, batch_size, hardware, desc):
        return perplexity(model, split, batch_size, hardware, subject.objective.pad_id, desc)

    return _score(subject, when, _probe_splits(subject), evaluate)


def _samples(subject: Subject, when: str, before=None) -> list[dict]:
    """Greedy continuations of the samples' prompts: each with its completion before training and after."""
    from transfer.evaluation.samples import generate_samples

    said = subject.trainee.use(generate_samples, subject.tokenizer, subject.sample_inputs,
                               subject.cfg.eval.max_new_tokens, subject.hardware)  # fmt: skip
    if when == "baseline":
        return said
    return [{**b, "completion_after": a["completion"]} for b, a in zip(before, said, strict=True)]


def _diagnostics(subject: Subject, when: str, before=None):
    """Before: a CPU copy of what will train; after: the weight change per block, and CKA where eval.cka asks."""
    from transfer.evaluation import diagnostics

    if when == "baseline":
        return diagnostics.snapshot(subject.model)
    s = subject
    found = diagnostics.measure(s.model, before, s.trainee, s.objective, s.splits, s.cfg, s.hardware)
    log.info("%s", diagnostics.describe(found))
    return found


def _benchmarks(subject: Subject, when: str, before=None) -> dict:
    """Standard benchmarks through lm-evaluation-harness (eval.benchmarks), bench_<name>; none asked for: {}."""
    from transfer.evaluation import benchmarks

    return benchmarks.run(subject, when, before) if subject.cfg.eval.benchmarks else {}


def _benchmark_settings(subject: Subject) -> dict | None:
    from transfer.evaluation import benchmarks

    return benchmarks.settings(subject) if subject.cfg.eval.benchmarks else None


def _sample_settings(subject: Subject) -> str:
    from transfer import cache

    return cache.digest(subject.sample_inputs, subject.cfg.eval.max_new_tokens)


def _none(subject: Subject) -> list[str]:
    return []


EVALUATORS = {
    "objective": Evaluator(_objective, reads=_objective_splits),
    "probes": Evaluator(_probes, reads=_probe_splits),
    # its data: in its settings; batched: the harness's batches are of eval_batch_size (the plan's), whose padding
    # and shapes may move the bits of a score, and so a near tie between choices
    "benchmarks": Evaluator(_benchmarks, key=_benchmark_settings, reads=_none, tokenizes=True, of_the_data=False),
    # their prompts: in their settings
    "samples": Evaluator(_samples, scores=False, key=_sample_settings, reads=_none, batched=False, tokenizes=True),
    "diagnostics": Evaluator(_diagnostics, scores=False, cached=False),
}

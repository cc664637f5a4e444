"""One experiment, start to finish, in phases: load -> adapt (strategy) -> data (objective) ->
evaluate -> train -> evaluate -> record (`metrics.json`).

The record is written when the run starts (status `running`), after the baseline,
and at the end (`completed`, `failed` or `interrupted`, with a one-line error), so a
folder always tells how far its run got (RunRecord). With resume=true a completed run is skipped and
an interrupted one continues from its last checkpoint. What differs between strategies is
the strategy's business (strategies/), between objectives the objective's (objectives/), what a
run is judged on the evaluators' (evaluation/), where its curves go the loggers' (training/loggers.py).
"""

import contextlib
import json
import logging
import platform
import random
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from transfer import STARTED, cache, evaluation
from transfer.config import checks, folders
from transfer.config.model import model_shape
from transfer.config.optimizer import learning_rate
from transfer.data import probes
from transfer.data.sequences import percentile
from transfer.errors import TransferError
from transfer.fmt import describe_metrics, duration, number, where
from transfer.job import JobContext, RunRecord
from transfer.models.anatomy import parameter_report
from transfer.models.load import context_length, load_model_and_tokenizer
from transfer.objectives import build_objective
from transfer.record import TRAINED
from transfer.strategies import apply_strategy, check_before_loading, loading_options
from transfer.train import train
from transfer.training import distributed, speed
from transfer.training.hardware import resolve, return_freed_memory, warn_if_busy
from transfer.training.loggers import open_loggers, scalars_of
from transfer.training.oom import MemoryPlan
from transfer.training.restore import check_same_config, find_resume_point, load_parent

log = logging.getLogger("transfer")
_IN_CODE = "{} (in the package)"  # the tiny models: no name_or_path, built from the package


def run_experiment(cfg: DictConfig, out_dir: Path, choices: dict, overrides: list[str] = (),
                   started: float = STARTED, sweep: Path | None = None, context: JobContext | None = None) -> dict:  # fmt: skip
    """`started`: when this job began (the process's start for its first job, whose imports count).
    `sweep`: the sweep's folder, whose jobs share tokens and baselines (transfer/cache.py).
    `context`: the job's undo work (JobContext, made by cli.job); one of its own when called alone."""
    if context is None:
        with JobContext() as context:
            return run_experiment(cfg, out_dir, choices, overrides, started, sweep, context)
    out_dir = Path(out_dir)
    previous = _completed_before(cfg, out_dir)
    if previous is not None:
        return previous
    # verified (every file's checksum: by rank 0 alone under torchrun), before anything is written
    resume_from = distributed.from_rank_zero(lambda: find_resume_point(cfg.resume, out_dir))
    if resume_from is not None:
        check_same_config(resume_from, cfg)
    # the loggers close after the record's last write, so that the trackers keep the record as the run ended
    with contextlib.ExitStack() as closing, RunRecord(out_dir, cfg, choices, overrides) as record:
        log.info("output folder: %s (metrics.json, transfer.log)", where(out_dir))
        checks.check_config(cfg)
        hardware = _set_up(cfg, record, context, sweep)
        model, tokenizer, placed = _load_and_adapt(cfg, hardware, record, choices)
        if cfg.dry_run:
            record["status"] = "dry_run"
            log.info("dry run: its record is in %s", where(out_dir))
            return record.data
        subject = _data(cfg, model, tokenizer, placed, hardware, record)
        # a resumed run's curves go on from its checkpoint's step (what the killed run logged after it is hidden)
        resumed_step = int(resume_from.name.split("-")[-1]) if resume_from is not None else None
        params = _hparams(record.data, choices, overrides)
        logger = closing.enter_context(open_loggers(cfg, out_dir, resumed_step, params, overrides, sweep))
        before = _baseline(subject, record, logger, log_step_zero=resumed_step is None, started=started)
        record["train"] = train(model, subject.objective, subject.splits, cfg, hardware, logger, run_dir=out_dir,
                                resume_from=resume_from, baseline=record["eval"]["baseline"]["validation"],
                                plan=subject.plan, trainee=subject.trainee)  # fmt: skip
        _final(subject, before, record, logger, context, params)
        record["status"] = "pruned" if record["train"]["stop_reason"] == "pruned" else "completed"
        _log_outcome(record)
    return record.data


def _completed_before(cfg, out_dir: Path) -> dict | None:
    """The record of a run finished in `out_dir` (a search's pruned trial too), skipped with resume=true; else None."""
    previous = folders.read_previous(out_dir)
    if not previous or previous.get("status") not in TRAINED:
        return None
    if cfg.resume is not True:
        raise TransferError(f"{out_dir} already holds a completed run; choose another output folder (hydra.run.dir)")
    # the command line was compared with it at start-up where the sweep's layout allowed; again here
    if isinstance(previous.get("config"), dict):
        folders.refuse_differences(previous["config"], cfg, f"resume: {out_dir} ran with", "this job has")
    log.info("%s holds a completed run: skipped (resume=true)", out_dir)
    return previous


def _set_up(cfg, record: RunRecord, context: JobContext, sweep: Path | None):
    """The learning rate, the sweep's cache, the device, the seeds: the run's hardware."""
    lr, lr_from = learning_rate(cfg)
    record["optimizer"] = {"name": cfg.optimizer.name, "lr": lr, "lr_from": lr_from}  # the rate the run starts at
    record["cache"] = context.use_cache(_cache_folder(cfg, sweep))  # hits and misses, filled as the job goes
    hardware = resolve(cfg.hardware)
    if not cfg.dry_run:  # which measures no speed
        warn_if_busy(log)
    hardware.reset_peak_memory()
    record["hardware"] = {"device": str(hardware.device), "precision": hardware.precision,
                          "name": _device_name(hardware.device), "processes": distributed.world_size()}  # fmt: skip
    seed_everything(cfg.seed)
    return hardware


def _load_and_adapt(cfg, hardware, record: RunRecord, choices: dict):
    """The model as the strategy adapts it and the speed options transform it: (model, tokenizer, whether the
    loading placed it on its device already)."""
    check_before_loading(cfg.strategy)
    loading = loading_options(cfg.strategy)
    # The counts need shapes, not weights: a dry run builds the model on the meta device, so a
    # 0.5B model takes a fraction of a second and a hub model is not downloaded; a strategy whose
    # layers exist only once real weights are quantized (QLoRA) says it needs them.
    shapes_only = cfg.dry_run and not loading["needs_weights"]
    if cfg.hardware.estimate_memory:  # before a weight is read: the config's shapes on fake tensors
        with record.timed("memory_estimate"):
            _memory_estimate(cfg, hardware, record)
    with record.timed("model_load"):
        model, tokenizer = load_model_and_tokenizer(cfg.model, cfg.block_size, quantize_4bit=loading["quantize_4bit"],
                                                    weights=not shapes_only)  # fmt: skip
        if cfg.init_from:  # another run's final weights, before this run's strategy adapts them
            if shapes_only:
                record["init_from"] = {"run": cfg.init_from, "weights": "not loaded (dry run)"}
            else:
                model, record["init_from"] = load_parent(model, Path(cfg.init_from).expanduser())
    record["model"] = {
        "class": type(model).__name__,
        "name_or_path": cfg.model.name_or_path or _IN_CODE.format(cfg.model.name),
        "layers": model.config.num_hidden_layers,
        "context": context_length(model.config),
        "vocab_size": model.config.vocab_size,
        "weights": "not loaded (dry run: shapes on the meta device)"
        if shapes_only
        else loading["weights"] or cfg.model.dtype.value,
    }
    with torch.device("meta") if shapes_only else contextlib.nullcontext():
        model, _ = apply_strategy(model, cfg.strategy, seed=cfg.seed)
    record["transforms"] = speed.apply_transforms(model, cfg)
    record["params"] = parameter_report(model)
    if cfg.hardware.return_freed_memory and not cfg.dry_run:  # before the baseline, the first to free a batch's tensors
        record["hardware"]["return_freed_memory"] = return_freed_memory()  # the process's: a sweep's later jobs keep it
    log.info(_summary(record.data, choices))
    return model, tokenizer, loading["placed"]


def _data(cfg, model, tokenizer, placed: bool, hardware, record: RunRecord) -> evaluation.Subject:
    """The objective's splits and the forgetting probes (ref_<name>); the model on its device, shared among the
    processes: all the evaluators need (evaluation.Subject)."""
    with record.timed("data_load"):
        objective = build_objective(cfg, tokenizer)
        splits = objective.prepare(cfg.eval.max_tokens)
        splits.update(probes.probe_splits(cfg, tokenizer))
        record["eval"]["probes"] = probes.describe(cfg, tokenizer)
        record["data"] = {"block_size": cfg.block_size, **{name: seqs.summary() for name, seqs in splits.items()}}
        record["data"].update(objective.data_summary())  # lm: the replay mixed into training
        if not placed:
            model.to(hardware.device)
        attached = objective.attach(model, splits, cfg, hardware)  # a reference model, for preference objectives
        # several processes (torchrun): DDP or FSDP2, after the reference is made (it stays whole), before the optimizer
        trainee = distributed.Trainee(model, hardware.device, cfg.distributed.name)
        record["hardware"]["distributed"] = trainee.kind
        record["objective"] = {**objective.describe(), **attached}
        record["warnings"] = data_warnings(objective, splits, cfg, record["model"]["context"])
        for warning in record["warnings"]:
            log.warning("%s", warning)
        sample_inputs, record["samples_from"] = objective.sample_inputs(splits, list(cfg.dataset.prompts))
    plan = MemoryPlan(cfg, hardware)  # the batch sizes in use; what out of memory changes (hardware.on_oom)
    plan.movers = [model.to, objective.to]
    return evaluation.Subject(model, trainee, objective, splits, tokenizer, sample_inputs, cfg, hardware, plan)


def _baseline(subject: evaluation.Subject, record: RunRecord, logger, log_step_zero: bool, started: float) -> dict:
    """Every evaluator on the untrained model (or what a job of this sweep measured of the same function on the same
    tokens); step 0 of each curve; the time to the first step. Returns the evaluators' results, for the final."""
    with record.timed("baseline_eval_and_samples"):
        key = evaluation.cache_key(subject) if cache.active() else None
        results, kept = evaluation.at_baseline(subject, key)
        baseline = record["eval"]["baseline"] = evaluation.scores(results)
        if kept:  # what was computed here said itself as it was
            found = evaluation.scores({name: results[name] for name in kept})
            log.info("baseline of %s (from this sweep's cache: same tokens, same function)%s", ", ".join(kept),
                     "".join(f"; {name} {describe_metrics(m)}" for name, m in found.items()))  # fmt: skip
        for name, result in baseline.items() if log_step_zero else ():  # a resumed run logged them then
            logger.scalars(scalars_of(name, result), 0)
    # from the job's start to its first training step, less the parts measured above: imports, config, set-up
    timing = record.timing
    timing["clock_from"] = "process start" if started == STARTED else "job start"
    timing["to_first_step"] = time.perf_counter() - started
    timing["startup_overhead"] = timing["to_first_step"] - sum(
        timing.get(k, 0) for k in ("memory_estimate", "model_load", "data_load", "baseline_eval_and_samples")
    )
    record.write()
    return results


def _final(subject: evaluation.Subject, before: dict, record: RunRecord, logger, context: JobContext,
           params: dict) -> None:  # fmt: skip
    """Every evaluator again, on the weights eval.weights chose; what changed; the end's measures and summaries."""
    results = evaluation.at_final(subject, before)
    baseline, final = record["eval"]["baseline"], evaluation.scores(results)
    record["eval"]["final"] = final
    record["eval"]["change_pct"], record["eval"]["change"] = evaluation.changes(baseline, final)
    record.data.update(evaluation.others(results))  # samples, diagnostics
    record["memory"] = subject.hardware.peak_memory()
    record["memory_plan"] = subject.plan.record()
    gave_up = context.compile_gave_up() if record["transforms"]["compiled"] else []
    if gave_up:  # those functions ran uncompiled from then on: the speed is not all compiled blocks'
        record["transforms"]["compiled"]["gave_up"] = gave_up
        log.warning("torch.compile gave up and ran uncompiled from then on: %s", "; ".join(gave_up))
    record["hardware"]["device_at_end"] = str(subject.hardware.device)
    if distributed.is_main():
        _write_samples(record.out_dir, logger, record["samples"])
    _log_final(logger, record.data, params)


def _log_outcome(record: RunRecord) -> None:
    baseline, final = record["eval"]["baseline"], record["eval"]["final"]
    log.info(
        "validation %s -> %s%s in %s of training",
        describe_metrics(baseline["validation"]), describe_metrics(final["validation"]),
        "".join(f"; {name} perplexity {number(baseline[name]['perplexity'])} -> {number(final[name]['perplexity'])}"
                for name in record["eval"]["probes"]),
        duration(record["train"]["seconds"]),
    )  # fmt: skip
    log.info("%s: its record, log and curves are in %s", record["status"], where(record.out_dir))


def data_warnings(objective, splits, cfg, context: int | None = None) -> list[str]:
    """What makes a result mean less than it seems: too few examples for a step, pairs truncated into sameness.
    `context`: the loaded model's (a hub model's is known only then); else what its config folder says."""
    warnings = objective.data_warnings()
    lr, lr_from = learning_rate(cfg)
    if lr_from == "strategy" and cfg.model.name_or_path is not None:  # rates shrink as models widen
        warnings.append(
            f"optimizer.lr is unset: strategy.lr={lr} was chosen on the tiny model (docs/strategies.md); "
            f"set optimizer.lr for {cfg.model.name_or_path}"
        )
    per_step, units = cfg.micro_batch_size * cfg.grad_accum_steps, objective.units(splits["train"])
    if units < per_step:
        warnings.append(
            f"the training split holds {units} examples, fewer than one step's {per_step} "
            f"(micro_batch_size x grad_accum_steps): every step repeats examples"
        )
    cut = _cut_examples(getattr(objective, "whole_lengths", {}).get("train"), cfg, context)
    warnings += [cut] if cut else []
    for name in ("train", "validation", "test"):
        summary = splits[name].summary()
        same = summary.get("identical_after_truncation", 0)
        if same:
            warnings.append(
                f"{same} {name} pairs left out: cut to block_size={cfg.block_size}, chosen and rejected were the same"
            )
        if summary.get("identical_in_file"):
            warnings.append(
                f"{summary['identical_in_file']} {name} pairs left out: their chosen and rejected answers are the same "
                "as written in the data"
            )
    return warnings


def _cut_examples(whole: list[int] | None, cfg, context: int | None, keep: float = 95.0) -> str | None:
    """More than 5 % of the training examples longer than block_size: how many, and the block_size that keeps 95 %
    whole, or that the model's context cannot (a block_size is not a dataset's to choose: it depends on the tokenizer,
    and every split, probe and memory figure of a run follows it)."""
    if not whole or percentile(whole, keep) <= cfg.block_size:
        return None
    over, needed = sum(n > cfg.block_size for n in whole), percentile(whole, keep)
    does, done = ("drops", "dropped") if cfg.objective.truncation.value == "drop" else ("cuts", "cut")
    line = f"{over} of {len(whole)} training examples are longer than block_size={cfg.block_size}, which {does} them"
    if context is None:
        _, context = model_shape(cfg.model, weights=False)
    if context is not None and needed > context:
        still = sum(n > context for n in whole)
        return (f"{line}; keeping {keep:g} % of them whole would take block_size={needed}, past the model's context "
                f"of {context} tokens (at {context}, {still} are still {done})")  # fmt: skip
    return f"{line}; block_size={needed} would keep {keep:g} % of them whole"


def _memory_estimate(cfg, hardware, record: dict) -> None:
    """The estimated peak (transfer/memory.py), logged, and one warning line when it does not fit; far over
    (memory.refusal) the run is refused here, before a weight is read, unless it is a dry run, which reads none.

    It is one process's holding the whole model. Under torchrun rank 0 makes it for all, and it is not judged
    against the device: FSDP2 shares weights, gradients and optimizer states among the processes, DDP's buckets
    add a copy of the gradients, and neither is modelled."""
    from transfer.training.memory import fits_advice, memory_limit, refusal, safe_estimate

    def estimate():
        shapes, _ = load_model_and_tokenizer(cfg.model, cfg.block_size, weights=False)  # the meta device: no weights
        return safe_estimate(cfg, shapes, hardware.device, hardware.precision)

    found = distributed.from_rank_zero(estimate)
    record["memory_estimate"] = found
    if found is None:
        return
    if distributed.active():
        found["notes"].append(
            f"one process holding the whole model, not each of torchrun's {distributed.world_size()}: FSDP2 "
            "shares weights, gradients and optimizer states among them, DDP's buckets add a copy of the gradients"
        )
    t, gib = found["training"], 2**30
    log.info(
        "estimated peak %.3g GiB on %s: weights %.3g, gradients %.3g, optimizer %.3g, activations and "
        "temporaries %.3g GiB at the training step's peak (%.3g a block, %.3g the head and loss); evaluation %.3g GiB",
        found["peak_bytes"] / gib, found["on"], t["weights"] / gib, t["gradients"] / gib, t["optimizer"] / gib,
        t["activations"] / gib, t["activations_per_block"] / gib, t["head_and_loss"] / gib,
        found["evaluation"]["peak"] / gib,
    )  # fmt: skip
    if "resident_peak_bytes" in found:  # on a CPU: what VmHWM, the record's `memory`, will be compared with
        log.info("with the process's own %.3g GiB when estimated (libraries, the tokenizer): a resident set of %.3g "
                 "GiB at the peak", found["process_bytes"] / gib, found["resident_peak_bytes"] / gib)  # fmt: skip
    if distributed.active():
        log.info("the estimate is %s", found["notes"][-1])
    limit = memory_limit(cfg, hardware.device)
    judged = bool(limit) and not distributed.active()
    refused = refusal(cfg, found, limit, hardware.device) if judged and not cfg.dry_run else None
    advice = refused or (fits_advice(cfg, found, limit) if judged else None)
    record["memory_estimate"] = {**found, "limit_bytes": limit, "advice": advice, "refused": bool(refused)}
    if refused:
        raise TransferError(refused)  # the record keeps the estimate that refused it
    if advice:
        log.warning("%s", advice)


def _cache_folder(cfg, sweep: Path | None) -> Path | None:
    """Where this job shares work: cache.dir, else the sweep's .cache; none for a single run or several processes."""
    if not cfg.cache.enabled or distributed.active():  # ranks would race to score shards of one baseline
        return None
    if cfg.cache.dir:
        return Path(cfg.cache.dir).expanduser()
    return sweep / ".cache" if sweep is not None else None


def _write_samples(out_dir: Path, logger, samples: list[dict]) -> None:
    (out_dir / "samples.json").write_text(json.dumps(samples, indent=2, ensure_ascii=False))
    for i, s in enumerate(samples):
        reference = f"\n\n**reference:** {s['reference']}" if "reference" in s else ""
        text = f"**prompt:** {s['prompt']}{reference}\n\n**before:** {s['completion']}\n\n**after:** {s['completion_after']}"
        logger.text(f"samples/{i}", text)


def _hparams(record: dict, choices: dict, overrides: list[str]) -> dict:
    """The job's choices and overrides (not Hydra's own) and its trainable parameters: what trackers compare runs by."""
    hp = {group: str(choice) for group, choice in choices.items()}
    hp.update({o.split("=", 1)[0]: o.split("=", 1)[1] for o in overrides if "=" in o and not o.startswith("hydra")})
    hp["trainable_params"] = record["params"]["trainable"]
    return hp


def _log_final(logger, record: dict, params: dict) -> None:
    """Final scalars, and the hyper-parameters against the results (TensorBoard's HParams dashboard)."""
    steps = record["train"]["steps"]
    metrics = {}
    for name, result in record["eval"]["final"].items():
        if name != "validation" or not record["train"]["validation_curve"]:  # the loop drew validation already
            logger.scalars(scalars_of(name, result), steps)
        metrics.update({f"final/{name}_{k}": v for k, v in result.items() if isinstance(v, float) and k != "loss"})
    metrics["final/train_seconds"] = record["train"]["seconds"]
    metrics["final/trainable_pct"] = record["params"]["trainable_pct"]
    logger.hparams(params, metrics)
    logger.scalars(metrics, steps)


def _summary(record: dict, choices: dict) -> str:
    p = record["params"]
    parts = ", ".join(f"{k} {v:,}" for k, v in p["breakdown"].items() if v)
    blocks = p["trainable_blocks"]
    block_text = f"blocks {blocks[0]}-{blocks[-1]} of {p['num_blocks']}" if blocks else f"no block of {p['num_blocks']}"
    tied = ""
    if p["tied_embeddings"]:
        tied = f" | tied embeddings, shared matrix {'trains' if p['shared_matrix_trains'] else 'frozen'}"
    labels = dict(choices)
    if record["model"]["name_or_path"] != _IN_CODE.format(choices.get("model")):  # name_or_path may override a preset
        labels["model"] = Path(record["model"]["name_or_path"]).name
    return (
        f"{' · '.join(str(v) for v in labels.values())} | {p['trainable']:,} of {p['total']:,} parameters train "
        f"({p['trainable_pct']:.2f}%: {parts or 'nothing'}; {block_text}){tied} | "
        f"{record['hardware']['device']} {record['hardware']['precision']}"
    )


def seed_everything(seed: int) -> None:
    """transformers.set_seed's work, without importing its Trainer stack and peft: 5 s of start-up."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # every CUDA device too


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()

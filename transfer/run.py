"""One experiment, start to finish, in phases: load -> adapt (strategy) -> data (objective) ->
evaluate -> train -> evaluate -> record (`metrics.json`).

The record is written when the run starts (status `running`), after the baseline,
and at the end (`completed`, `failed` or `interrupted`, with a one-line error), so a
folder always tells how far its run got. With resume=true a completed run is skipped and
an interrupted one continues from its last checkpoint. What differs between strategies is
the strategy's business (strategies/), between objectives the objective's (objectives/).
"""

import contextlib
import json
import logging
import platform
import random
import time
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import numpy as np
import torch
import transformers
from omegaconf import DictConfig, OmegaConf
from torch.utils.tensorboard import SummaryWriter

from transfer import STARTED, cache
from transfer.config import checks, folders
from transfer.config.optimizer import learning_rate
from transfer.data import probes
from transfer.errors import TransferError, first_line
from transfer.evaluation import diagnostics
from transfer.evaluation.perplexity import perplexity
from transfer.evaluation.samples import generate_samples
from transfer.fmt import duration
from transfer.models.anatomy import parameter_report
from transfer.models.load import context_length, load_model_and_tokenizer
from transfer.objectives import build_objective
from transfer.record import TRAINED, write_record
from transfer.strategies import apply_strategy, check_before_loading, loading_options
from transfer.train import describe_metrics, log_metrics, train
from transfer.training import distributed
from transfer.training.hardware import resolve
from transfer.training.oom import MemoryPlan
from transfer.training.restore import check_same_config, find_resume_point, load_parent
from transfer.training.speed import apply_transforms, compile_gave_up

log = logging.getLogger("transfer")
RECORD_VERSION = 3  # 2: objectives, metrics per split by name, real tokens; 3: forgetting probes ref_<name>
EVAL_SPLITS = ("validation", "test")
_IN_CODE = "{} (in the package)"  # the tiny models: no name_or_path, built from the package


def run_experiment(cfg: DictConfig, out_dir: Path, choices: dict, overrides: list[str] = (),
                   started: float = STARTED, sweep: Path | None = None) -> dict:  # fmt: skip
    """`started`: when this job began (the process's start for its first job, whose imports count).
    `sweep`: the sweep's folder, whose jobs share tokens and baselines (transfer/cache.py)."""
    out_dir = Path(out_dir)
    previous = folders.read_previous(out_dir)
    if previous and previous.get("status") in TRAINED:  # finished: a search's pruned trial too
        if cfg.resume is True:
            # the command line was compared with it at start-up where the sweep's layout allowed; again here
            if isinstance(previous.get("config"), dict):
                folders.refuse_differences(previous["config"], cfg, f"resume: {out_dir} ran with", "this job has")
            log.info("%s holds a completed run: skipped (resume=true)", out_dir)
            return previous
        raise TransferError(f"{out_dir} already holds a completed run; choose another output folder (hydra.run.dir)")
    # verified (every file's checksum: by rank 0 alone under torchrun), before anything is written
    resume_from = distributed.from_rank_zero(lambda: find_resume_point(cfg.resume, out_dir))
    if resume_from is not None:
        check_same_config(resume_from, cfg)
    record = {
        "record_version": RECORD_VERSION,
        "status": "running",
        "error": None,
        "choices": dict(choices),
        "overrides": list(overrides),
        "config": OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
        "started_at": _now(),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },  # fmt: skip
        "eval": {},
    }
    write = write_record if distributed.is_main() else lambda *args: None  # one writer: rank 0
    write(out_dir, record)
    wall_start = time.perf_counter()
    timing = record["timing"] = {}
    try:
        checks.check_config(cfg)
        lr, lr_from = learning_rate(cfg)
        record["optimizer"] = {"name": cfg.optimizer.name, "lr": lr, "lr_from": lr_from}  # the rate the run starts at
        record["cache"] = cache.start(_cache_folder(cfg, sweep))  # hits and misses, filled as the job goes
        hardware = resolve(cfg.hardware)
        hardware.reset_peak_memory()
        record["hardware"] = {"device": str(hardware.device), "precision": hardware.precision,
                              "name": _device_name(hardware.device), "processes": distributed.world_size()}  # fmt: skip
        seed_everything(cfg.seed)

        # load and adapt
        check_before_loading(cfg.strategy)
        loading = loading_options(cfg.strategy)
        # The counts need shapes, not weights: a dry run builds the model on the meta device, so a
        # 0.5B model takes a fraction of a second and a hub model is not downloaded; a strategy whose
        # layers exist only once real weights are quantized (QLoRA) says it needs them.
        shapes_only = cfg.dry_run and not loading["needs_weights"]
        if cfg.hardware.estimate_memory:  # before a weight is read: the config's shapes on fake tensors
            clock = time.perf_counter()
            _memory_estimate(cfg, hardware, record)
            timing["memory_estimate"] = time.perf_counter() - clock
        clock = time.perf_counter()
        model, tokenizer = load_model_and_tokenizer(cfg.model, cfg.block_size, quantize_4bit=loading["quantize_4bit"],
                                                    weights=not shapes_only)  # fmt: skip
        if cfg.init_from:  # another run's final weights, before this run's strategy adapts them
            if shapes_only:
                record["init_from"] = {"run": cfg.init_from, "weights": "not loaded (dry run)"}
            else:
                model, record["init_from"] = load_parent(model, Path(cfg.init_from).expanduser())
        timing["model_load"] = time.perf_counter() - clock
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
        record["transforms"] = apply_transforms(model, cfg)
        record["params"] = parameter_report(model)
        log.info(_summary(record, choices))
        if cfg.dry_run:
            record["status"] = "dry_run"
            return record

        # data: the objective's splits, and the forgetting probes (ref_<name>)
        clock = time.perf_counter()
        objective = build_objective(cfg, tokenizer)
        splits = objective.prepare(cfg.eval.max_tokens)
        splits.update(probes.probe_splits(cfg, tokenizer))
        record["eval"]["probes"] = probes.describe(cfg, tokenizer)
        record["data"] = {"block_size": cfg.block_size, **{name: seqs.summary() for name, seqs in splits.items()}}
        record["data"].update(objective.data_summary())  # lm: the replay mixed into training
        if not loading["placed"]:
            model.to(hardware.device)
        attached = objective.attach(model, splits, cfg, hardware)  # a reference model, for preference objectives
        # several processes (torchrun): DDP or FSDP2, after the reference is made (it stays whole), before the optimizer
        trainee = distributed.Trainee(model, hardware.device, cfg.distributed.name)
        record["hardware"]["distributed"] = trainee.kind
        record["objective"] = {**objective.describe(), **attached}
        record["warnings"] = data_warnings(objective, splits, cfg)
        for warning in record["warnings"]:
            log.warning("%s", warning)
        sample_inputs, record["samples_from"] = objective.sample_inputs(splits, list(cfg.dataset.prompts))
        timing["data_load"] = time.perf_counter() - clock

        # A resumed run rewrites its curves from the checkpoint's step on: TensorBoard hides what
        # the killed run logged after it (purge_step), and step 0, logged then, is not logged twice.
        # A run started again in its folder (nothing to resume from) hides all of the earlier one's.
        resumed_step = int(resume_from.name.split("-")[-1]) if resume_from is not None else None
        purge_step = 0 if resumed_step is None else resumed_step + 1
        plan = MemoryPlan(cfg, hardware)  # the batch sizes in use; what out of memory changes (hardware.on_oom)
        plan.movers = [model.to, objective.to]
        tensorboard = SummaryWriter(log_dir=str(out_dir), purge_step=purge_step) if distributed.is_main() else None
        with tensorboard or contextlib.nullcontext() as writer:
            # evaluate (or reuse what a job of this sweep measured of the same function on the same tokens)
            clock = time.perf_counter()
            score = lambda: {  # noqa: E731
                "eval": _evaluate_splits(objective, trainee, splits, plan, hardware, "baseline"),
                "samples": trainee.use(generate_samples, tokenizer, sample_inputs, cfg.eval.max_new_tokens, hardware),
            }
            key = _baseline_key(cfg, objective, trainee, splits, hardware, sample_inputs) if cache.active() else None
            scored, kept = cache.baseline(key, score)
            baseline = record["eval"]["baseline"] = scored["eval"]
            before = scored["samples"]
            if kept:
                log.info("baseline: %s (from this sweep's cache: same tokens, same function)",
                         "; ".join(f"{name} {describe_metrics(m)}" for name, m in baseline.items()))  # fmt: skip
            for name, result in baseline.items() if resumed_step is None and writer is not None else ():
                log_metrics(writer, name, result, 0)  # step 0 of each curve
            timing["baseline_eval_and_samples"] = time.perf_counter() - clock
            # from the job's start to its first training step, less the parts measured above: imports, config, set-up
            timing["clock_from"] = "process start" if started == STARTED else "job start"
            timing["to_first_step"] = time.perf_counter() - started
            timing["startup_overhead"] = timing["to_first_step"] - sum(
                timing.get(k, 0) for k in ("memory_estimate", "model_load", "data_load", "baseline_eval_and_samples")
            )
            write(out_dir, record)

            # train
            initial = diagnostics.snapshot(model)  # a CPU copy of what will train, for the layer-wise diagnostics
            record["train"] = train(model, objective, splits, cfg, hardware, writer, run_dir=out_dir,
                                    resume_from=resume_from, baseline=baseline["validation"], plan=plan,
                                    trainee=trainee)  # fmt: skip

            # evaluate again, the same splits
            final = record["eval"]["final"] = _evaluate_splits(objective, trainee, splits, plan, hardware, "final")
            record["eval"]["change_pct"] = {  # of perplexity, where the split has one
                name: _change_pct(baseline[name]["perplexity"], final[name]["perplexity"])
                for name in final
                if "perplexity" in final[name]
            }
            record["eval"]["change"] = {
                name: {k: final[name][k] - v for k, v in baseline[name].items() if isinstance(v, float)
                       and isinstance(final[name].get(k), float)}
                for name in final
            }  # fmt: skip
            after = trainee.use(generate_samples, tokenizer, sample_inputs, cfg.eval.max_new_tokens, hardware)
            record["diagnostics"] = diagnostics.measure(model, initial, trainee, objective, splits, cfg, hardware)
            log.info("%s", diagnostics.describe(record["diagnostics"]))

            # record
            record["samples"] = [{**b, "completion_after": a["completion"]} for b, a in zip(before, after, strict=True)]
            record["memory"] = hardware.peak_memory()
            record["memory_plan"] = plan.record()
            gave_up = compile_gave_up() if record["transforms"]["compiled"] else []
            if gave_up:  # those functions ran uncompiled from then on: the speed is not all compiled blocks'
                record["transforms"]["compiled"]["gave_up"] = gave_up
                log.warning("torch.compile gave up and ran uncompiled from then on: %s", "; ".join(gave_up))
            record["hardware"]["device_at_end"] = str(hardware.device)
            if writer is not None:
                _write_samples(out_dir, writer, record["samples"])
                _log_final(writer, record, choices, overrides)
        record["status"] = "pruned" if record["train"]["stop_reason"] == "pruned" else "completed"
        log.info(
            "validation %s -> %s%s in %.3g s of training",
            describe_metrics(baseline["validation"]), describe_metrics(final["validation"]),
            "".join(f"; {name} perplexity {baseline[name]['perplexity']:.4g} -> {final[name]['perplexity']:.4g}"
                    for name in record["eval"]["probes"]),
            record["train"]["seconds"],
        )  # fmt: skip
    except KeyboardInterrupt as e:
        record["status"] = "interrupted"
        record["error"] = f"interrupted ({'SIGTERM' if str(e) == 'SIGTERM' else 'Ctrl-C'}); resume it with resume=true"
        raise
    except BaseException as e:
        record["status"] = "failed"
        record["error"] = first_line(e) if isinstance(e, TransferError) else f"{type(e).__name__}: {first_line(e)}"
        raise
    finally:
        cache.stop()
        record["finished_at"] = _now()
        record["wall_seconds"] = time.perf_counter() - wall_start
        try:
            write(out_dir, record)
        except TransferError as e:  # a full disk
            if record["status"] in TRAINED:
                raise
            log.error("%s", e)  # and the error that ended the run is reported after this
    return record


def data_warnings(objective, splits, cfg) -> list[str]:
    """What makes a result mean less than it seems: too few examples for a step, pairs truncated into sameness."""
    warnings = objective.data_warnings()
    lr, lr_from = learning_rate(cfg)
    if lr_from == "strategy" and cfg.model.name_or_path is not None:  # rates shrink as models widen
        warnings.append(
            f"optimizer.lr is unset: strategy.lr={lr} was chosen on the tiny model (README: Strategies); "
            f"set optimizer.lr for {cfg.model.name_or_path}"
        )
    per_step, units = cfg.micro_batch_size * cfg.grad_accum_steps, objective.units(splits["train"])
    if units < per_step:
        warnings.append(
            f"the training split holds {units} examples, fewer than one step's {per_step} "
            f"(micro_batch_size x grad_accum_steps): every step repeats examples"
        )
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


def _baseline_key(cfg, objective, trainee, splits, hardware, sample_inputs) -> dict:
    """Everything the untrained model's scores depend on; the model enters as what it computes, the objective as
    its settings and what it made of the data (its template, the choices as scored, its reference)."""
    evaluated = {name: cache.digest(*s.content()) for name, s in splits.items() if name != "train"}
    return {
        "function": trainee.use(cache.model_function, splits, hardware),
        "splits": evaluated,
        "objective": OmegaConf.to_container(cfg.objective, resolve=True, enum_to_str=True),
        "objective_as_built": objective.baseline_key(),
        "choices": list(cfg.dataset.get("choices") or []),
        "eval_batch_size": cfg.eval_batch_size,
        "samples": cache.digest(sample_inputs, cfg.eval.max_new_tokens),
        "hardware": {
            "device": hardware.device.type,
            "precision": hardware.precision,
            "loss_chunk_tokens": cfg.hardware.loss_chunk_tokens,
        },  # fmt: skip
        "environment": cache.environment(),
    }


def _evaluate_splits(objective, trainee, splits, plan, hardware, when: str) -> dict:
    """Validation and test by the objective's evaluators; the forgetting probes by perplexity. A line each.

    Out of memory, an evaluation is tried again as hardware.on_oom says (plan: transfer.training.oom)."""
    results = {}
    for name in (*EVAL_SPLITS, *(s for s in splits if s.startswith(probes.PREFIX))):
        if name not in splits:
            continue
        clock = time.perf_counter()
        evaluate = partial(trainee.use, _evaluate, objective, splits[name], name, hardware, f"{when} {name}")
        results[name] = plan.evaluate(evaluate, f"{when} {name} evaluation")
        log.info("%s %s: %s (%s)", when, name, describe_metrics(results[name]), duration(time.perf_counter() - clock))
    return results


def _evaluate(model, objective, split, name: str, hardware, desc: str, batch_size: int) -> dict:
    if name.startswith(probes.PREFIX):  # a forgetting probe: perplexity, whatever the objective
        return perplexity(model, split, batch_size, hardware, objective.pad_id, desc)
    return objective.evaluate(model, split, batch_size, hardware, desc)


def _write_samples(out_dir: Path, writer, samples: list[dict]) -> None:
    (out_dir / "samples.json").write_text(json.dumps(samples, indent=2, ensure_ascii=False))
    for i, s in enumerate(samples):
        reference = f"\n\n**reference:** {s['reference']}" if "reference" in s else ""
        text = f"**prompt:** {s['prompt']}{reference}\n\n**before:** {s['completion']}\n\n**after:** {s['completion_after']}"
        writer.add_text(f"samples/{i}", text)


def _log_final(writer, record: dict, choices: dict, overrides: list[str]) -> None:
    """Final scalars, and the HParams dashboard: this run's choices against its results."""
    from torch.utils.tensorboard.summary import hparams

    steps = record["train"]["steps"]
    metrics = {}
    for name, result in record["eval"]["final"].items():
        if name != "validation" or not record["train"]["validation_curve"]:  # the loop drew validation already
            log_metrics(writer, name, result, steps)
        metrics.update({f"final/{name}_{k}": v for k, v in result.items() if isinstance(v, float) and k != "loss"})
    metrics["final/train_seconds"] = record["train"]["seconds"]
    metrics["final/trainable_pct"] = record["params"]["trainable_pct"]
    hp = {group: str(choice) for group, choice in choices.items()}
    hp.update({o.split("=", 1)[0]: o.split("=", 1)[1] for o in overrides if "=" in o and not o.startswith("hydra")})
    hp["trainable_params"] = record["params"]["trainable"]
    experiment, start, end = hparams(hp, metrics)
    for summary in (experiment, start, end):
        writer.file_writer.add_summary(summary)
    for key, value in metrics.items():
        writer.add_scalar(key, value, steps)


def _change_pct(before: float, after: float) -> float:
    return 100.0 * (after - before) / before


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


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")

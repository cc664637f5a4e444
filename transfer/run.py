"""One experiment, start to finish: config -> model, data, strategy -> baseline
evaluation -> training -> final evaluation -> `metrics.json`.

The record is written when the run starts (status `running`), after the baseline,
and at the end (`completed`, or `failed` with a one-line error), so a folder
always tells how far its run got.
"""

import logging
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import transformers
from omegaconf import DictConfig, OmegaConf
from torch.utils.tensorboard import SummaryWriter

from transfer import validate
from transfer.data import load_splits
from transfer.errors import TransferError, first_line
from transfer.evaluate import evaluate
from transfer.hardware import resolve
from transfer.models import context_length, load_model_and_tokenizer
from transfer.record import read_record, write_record
from transfer.strategies import apply_strategy, check_before_loading, parameter_report
from transfer.train import train

log = logging.getLogger("transfer")
EVAL_SPLITS = ("validation", "test")


def run_experiment(cfg: DictConfig, out_dir: Path, choices: dict, overrides: list[str] = ()) -> dict:
    out_dir = Path(out_dir)
    previous = read_record(out_dir)
    if previous and previous.get("status") == "completed":
        raise TransferError(f"{out_dir} already holds a completed run; choose another output folder (hydra.run.dir)")
    record = {
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
        },
        "eval": {},
    }
    write_record(out_dir, record)
    wall_start = time.perf_counter()
    try:
        validate.check_config(cfg)
        hardware = resolve(cfg.hardware)
        record["hardware"] = {
            "device": str(hardware.device),
            "precision": hardware.precision,
            "name": _device_name(hardware.device),
        }
        transformers.set_seed(cfg.seed)

        check_before_loading(cfg.strategy)
        quantize = cfg.strategy.name == "qlora"
        model, tokenizer = load_model_and_tokenizer(cfg.model, cfg.block_size, quantize_4bit=quantize)
        record["model"] = {
            "class": type(model).__name__,
            "name_or_path": cfg.model.name_or_path or "tiny (built in code)",
            "layers": model.config.num_hidden_layers,
            "context": context_length(model.config),
            "vocab_size": model.config.vocab_size,
            "weights": "4-bit NF4" if quantize else cfg.model.dtype.value,
        }
        model, _ = apply_strategy(model, cfg.strategy, seed=cfg.seed)
        record["params"] = parameter_report(model)
        log.info(_summary(record, choices))
        if cfg.dry_run:
            record["status"] = "dry_run"
            return record
        splits = load_splits(cfg.dataset, tokenizer, cfg.block_size)
        record["data"] = {"block_size": cfg.block_size, **{name: b.summary() for name, b in splits.items()}}
        if not quantize:  # bitsandbytes placed the 4-bit weights already
            model.to(hardware.device)

        with SummaryWriter(log_dir=str(out_dir)) as writer:
            record["eval"]["baseline"] = _evaluate_splits(model, splits, cfg, hardware, "baseline")
            write_record(out_dir, record)
            record["train"] = train(model, splits, cfg, hardware, writer)
            record["eval"]["final"] = _evaluate_splits(model, splits, cfg, hardware, "final")
            record["eval"]["change_pct"] = {
                name: _change_pct(
                    record["eval"]["baseline"][name]["perplexity"], record["eval"]["final"][name]["perplexity"]
                )
                for name in EVAL_SPLITS
            }
            steps = record["train"]["steps"]
            for name in EVAL_SPLITS:
                writer.add_scalar(f"{name}/loss", record["eval"]["final"][name]["loss"], steps)
                writer.add_scalar(f"{name}/perplexity", record["eval"]["final"][name]["perplexity"], steps)
        record["status"] = "completed"
        log.info(
            "validation perplexity %.3f -> %.3f (%+.1f%%) in %.1f s of training",
            record["eval"]["baseline"]["validation"]["perplexity"],
            record["eval"]["final"]["validation"]["perplexity"],
            record["eval"]["change_pct"]["validation"],
            record["train"]["seconds"],
        )
    except BaseException as e:
        record["status"] = "failed"
        record["error"] = first_line(e) if isinstance(e, TransferError) else f"{type(e).__name__}: {first_line(e)}"
        raise
    finally:
        record["finished_at"] = _now()
        record["wall_seconds"] = time.perf_counter() - wall_start
        write_record(out_dir, record)
    return record


def _evaluate_splits(model, splits, cfg, hardware, when: str) -> dict:
    return {
        name: evaluate(model, splits[name], cfg.eval_batch_size, hardware, desc=f"{when} {name}")
        for name in EVAL_SPLITS
    }


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
    return (
        f"{' · '.join(str(v) for v in choices.values())} | {p['trainable']:,} of {p['total']:,} parameters train "
        f"({p['trainable_pct']:.2f}%: {parts or 'nothing'}; {block_text}){tied} | "
        f"{record['hardware']['device']} {record['hardware']['precision']}"
    )


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")

"""`python -m transfer.export RUN [--merge] [--out FOLDER] [--weights best|last] [--check]`: a finished run's
tuned model as a standard Hugging Face folder, loadable with no `transfer` code.

The model is rebuilt as the run built it (its config, from its record: model, init_from, strategy),
and the weights its final evaluation used are put into it (`train.final_weights`; --weights picks
the best or the last instead). Then:

- full and freezing strategies (full, freeze_*, adapter, scratch) trained the model's own weights:
  the whole model is written, and --merge has nothing to do;
- peft strategies whose row in transfer/config/strategy.py says `mergeable` (lora, dora, ia3) with
  --merge: peft folds the adapter into the base weights (`merge_and_unload`), and the folder holds
  a plain model of the base's architecture and size; --merge of any other peft adapter is refused;
- peft strategies without --merge: the adapter in peft's format, with the base it adapts in `base/`
  (`PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(OUT / "base"), OUT)`);
- a strategy whose row says `four_bit` (qlora) is refused: its adapter was trained on a 4-bit NF4
  base, and folding it into weights of any precision gives a model that differs from the one
  evaluated; its adapter is in its checkpoint.

The tokenizer is written beside the model, and `export.json` says what was exported. --check
measures the exported model's validation perplexity, on the run's validation split prepared as
the run prepared it, and compares it with the figure the run recorded for those weights.
"""

import argparse
import json
import math
import os
import shutil
import sys
from datetime import datetime, timezone
from pathlib import Path

from transfer import fmt
from transfer.config.strategy import STRATEGIES
from transfer.errors import TransferError, first_line

EXPORT_RECORD = "export.json"
ADAPTER_BASE = "base"  # where an unmerged adapter's base model goes, inside the export folder


# ---------------------------------------------------------------- the run
def read_run(run_dir: Path) -> dict:
    """The record of a run that trained to its end; one line naming what is wrong otherwise."""
    from transfer.record import RECORD_NAME, TRAINED, read_record

    if not run_dir.is_dir():
        raise TransferError(f"{run_dir} is not a folder; allowed: a run folder (it holds {RECORD_NAME})")
    try:
        record = read_record(run_dir)
    except ValueError as e:
        raise TransferError(f"{run_dir / RECORD_NAME} is unreadable ({first_line(e)})") from None
    if record is None:
        raise TransferError(f"{run_dir} holds no {RECORD_NAME}; allowed: the folder of a completed run")
    status = record.get("status")
    if status not in TRAINED:
        error = f": {record['error']}" if record.get("error") else ""
        raise TransferError(
            f"{run_dir} holds a run with status {status!r}{error}; allowed: a run that completed "
            f"({' or '.join(TRAINED)})"
        )
    if not isinstance(record.get("config"), dict) or not (record.get("train") or {}).get("final_weights"):
        raise TransferError(f"{run_dir / RECORD_NAME} names no config or final weights (a record from before v2?)")
    return record


def run_config(record: dict, run_dir: Path):
    """The run's config with the schema's types: composed from its group options, the recorded values over them.

    Only the evaluation settings that decide the validation split are taken from `eval`: the
    rest of it (the forgetting corpora) plays no part in an export, and may have changed shape.
    """
    from omegaconf import OmegaConf

    from transfer.config.compose import CONF_DIR, compose_config

    saved, choices = record["config"], record.get("choices") or {}
    groups = [g for g in saved if g != "eval" and isinstance(saved[g], dict) and (CONF_DIR / g).is_dir()]
    cfg = compose_config([f"{g}={choices.get(g) or saved[g].get('name')}" for g in groups])
    values = {k: v for k, v in saved.items() if k != "eval"}
    values["eval"] = {k: saved["eval"][k] for k in ("max_tokens", "weights") if k in (saved.get("eval") or {})}
    try:
        return OmegaConf.merge(cfg, values)
    except Exception as e:  # omegaconf's errors have no common base worth naming
        raise TransferError(
            f"{run_dir}: its recorded config does not fit this version of transfer ({first_line(e)})"
        ) from None


def pick_weights(record: dict, run_dir: Path, which: str | None) -> dict:
    """{which, step, folder}: the final evaluation's weights, or the best or last; folder None for step 0.

    Step 0 is the untrained model (the best when training never beat it): nothing to load.
    """
    from transfer.training.restore import weights_folder

    train = record["train"]
    if which is None:
        which, step = train["final_weights"]["which"], train["final_weights"]["step"]
    elif which == "last":
        step = train["steps"]
    elif train.get("best_step") is None:
        raise TransferError(
            f"--weights best: {run_dir} kept no best weights (it validated only before and after "
            "training: eval_interval=0); allowed: --weights last"
        )
    else:
        step = train["best_step"]
    if step == 0:
        return {"which": which, "step": 0, "folder": None}
    return {"which": which, "step": step, "folder": weights_folder(run_dir, record, which, step, f"{run_dir}: the")}


def rebuild(cfg, weights: dict):
    """(model, tokenizer) as the run had them at the chosen step: base, parent, strategy, then the weights."""
    from transfer.models.load import load_model_and_tokenizer
    from transfer.strategies import apply_strategy
    from transfer.training.checkpoint import load_weights
    from transfer.training.restore import load_parent

    model, tokenizer = load_model_and_tokenizer(cfg.model, cfg.block_size)
    if cfg.init_from:
        model, _ = load_parent(model, Path(cfg.init_from).expanduser())
    model, _ = apply_strategy(model, cfg.strategy, seed=cfg.seed)
    if weights["folder"] is not None:
        load_weights(weights["folder"], model)
    model.eval()
    return model, tokenizer


# ---------------------------------------------------------------- the export
def check_exportable(strategy: str, merge: bool, run_dir: Path) -> None:
    """What the strategy's row says of its export: a 4-bit base is never exported, and --merge needs an
    adapter that folds exactly into the base weights."""
    from transfer.config.strategy import STRATEGIES

    spec = STRATEGIES.get(strategy)
    if spec is None:  # composing the run's config names it
        return
    exported = [name for name, s in STRATEGIES.items() if s.peft and not s.four_bit]
    if spec.four_bit:
        raise TransferError(
            f"strategy={strategy} is not exported: its adapter was trained on a 4-bit NF4 base, which no merge "
            f"reproduces; allowed: {', '.join(exported)} and the full strategies (the adapter itself is in {run_dir}/checkpoints)"
        )
    if merge and spec.peft and not spec.mergeable:
        mergeable = ", ".join(name for name, s in STRATEGIES.items() if s.mergeable)
        raise TransferError(
            f"--merge: strategy={strategy}'s adapter does not fold into the base weights; allowed: its export "
            f"without --merge (the adapter over its base), or --merge for {mergeable}"
        )


def default_out(run_dir: Path, strategy: str, merge: bool) -> Path:
    return run_dir / (
        "export-merged" if merge and strategy in STRATEGIES and STRATEGIES[strategy].mergeable else "export"
    )


def check_out(out: Path) -> None:
    for path, what in ((out, "--out"), (_tmp_of(out), "the export's temporary folder")):
        if path.is_symlink():  # dangling, or leading elsewhere: the export would land where the link points
            raise TransferError(f"{what}: {path} is a link (to {os.readlink(path)}); allowed: a new or empty folder")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise TransferError(f"{out} exists and is not an empty folder; allowed: a new or empty folder (--out)")


def _tmp_of(out: Path) -> Path:
    return out.with_name(f".{out.name}.tmp")


def export(run_dir: Path, merge: bool = False, out: Path | None = None, which: str | None = None) -> dict:
    """Write the run's tuned model to `out`; return what export.json says of it."""
    run_dir = Path(run_dir).resolve()
    record = read_run(run_dir)
    strategy = record["config"]["strategy"]["name"]
    check_exportable(strategy, merge, run_dir)
    out = Path(os.path.abspath(out)) if out is not None else default_out(run_dir, strategy, merge)
    check_out(out)
    weights = pick_weights(record, run_dir, which)
    cfg = run_config(record, run_dir)
    print(f"rebuilding {run_dir.name}: {describe_weights(record, weights)}", flush=True)
    model, tokenizer = rebuild(cfg, weights)
    _check_same_shape(model, record, run_dir)
    peft = hasattr(model, "peft_config")
    if merge and not peft:
        print(f"--merge: nothing to merge, strategy={strategy} trained the model's own weights", flush=True)
    info = {
        "run": str(run_dir),
        "strategy": strategy,
        "weights": {**weights, "folder": str(weights["folder"]) if weights["folder"] else None},
        "merged": bool(merge and peft),
        "format": "adapter" if peft and not merge else "model",
        "dtype": cfg.model.dtype.value,
        "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }

    def write(tmp: Path) -> None:
        info.update(_write(model, tokenizer, tmp, out, merge, peft))
        (tmp / EXPORT_RECORD).write_text(json.dumps(info, indent=2))

    _write_atomically(out, write)
    return {**info, "out": str(out)}


def _check_same_shape(model, record: dict, run_dir: Path) -> None:
    """The rebuilt model has the run's parameter count: a model or strategy that changed since is named, not exported."""
    from transfer.models.anatomy import parameter_report

    then, now = (record.get("params") or {}).get("total"), parameter_report(model)["total"]
    if then is not None and then != now:
        raise TransferError(
            f"{run_dir}: rebuilt, its model has {now:,} parameters where the run had {then:,} "
            "(the model or strategy changed since it ran); allowed: a run made with this version of transfer"
        )


def _write(model, tokenizer, tmp: Path, out: Path, merge: bool, peft: bool) -> dict:
    """The model's files in `tmp` (to become `out`); the parameter counts."""
    if peft and merge:
        print("merging the adapter into the base weights (peft merge_and_unload)", flush=True)
        model = model.merge_and_unload(safe_merge=True)  # safe: refuses a merge that makes NaNs
    if peft and not merge:
        adapter = sum(p.numel() for p in model.parameters() if p.requires_grad)
        model.peft_config["default"].base_model_name_or_path = str(out / ADAPTER_BASE)  # where its base is
        model.save_pretrained(tmp, save_embedding_layers=False)  # adapters target linear layers only (strategies)
        base = model.unload()
        base.save_pretrained(tmp / ADAPTER_BASE)
        tokenizer.save_pretrained(tmp / ADAPTER_BASE)
        tokenizer.save_pretrained(tmp)
        return {"parameters": count(base), "adapter_parameters": adapter, "class": type(base).__name__}
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    return {"parameters": count(model), "class": type(model).__name__}


def count(model) -> int:
    """Parameters, a tied matrix once (as `parameters()` yields it)."""
    return sum(p.numel() for p in model.parameters())


def _write_atomically(out: Path, write) -> None:
    """Write into a temporary sibling and rename it into place: a failed export leaves no half folder."""
    tmp = _tmp_of(out)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        os.replace(tmp, out)  # onto a missing or empty folder only (check_out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def describe_weights(record: dict, weights: dict) -> str:
    cfg = record["config"]
    model = (record.get("model") or {}).get("name_or_path") or cfg["model"].get("name_or_path") or cfg["model"]["name"]
    where = f" from {fmt.where(weights['folder'])}" if weights["folder"] else " (the untrained model: nothing to load)"
    return f"{model}, strategy {cfg['strategy']['name']}, {weights['which']} weights of step {weights['step']}{where}"


# ---------------------------------------------------------------- loading and checking an export
def load_export(out: Path):
    """(model, tokenizer) from an export folder, as its user would load them: transformers (and peft for an adapter)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(out)
    info = json.loads((out / EXPORT_RECORD).read_text())
    tokenizer = AutoTokenizer.from_pretrained(out)
    if info["format"] == "adapter":
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(out / ADAPTER_BASE, dtype=info["dtype"])
        return PeftModel.from_pretrained(base, out).eval(), tokenizer
    return AutoModelForCausalLM.from_pretrained(out, dtype=info["dtype"]).eval(), tokenizer


def recorded_validation(record: dict, step: int) -> dict:
    """The validation result the run recorded for the weights of `step`: final, baseline (0) or along the way."""
    final = record["eval"]["final"]["validation"]
    if step == record["train"]["final_weights"]["step"]:
        return final
    if step == 0:
        return record["eval"]["baseline"]["validation"]
    for point in record["train"].get("validation_curve") or []:
        if point["step"] == step:
            return point
    raise TransferError(f"--check: the run recorded no validation result for step {step}; export its final weights")


def check_export(out: Path, tolerance: float = 1e-4) -> dict:
    """The exported model's validation figures beside the ones the run recorded for the same weights.

    The split is the run's validation split, prepared by its objective with the exported tokenizer
    (so the tokenizer's round trip is checked too), scored on this machine's device for the run's
    hardware settings: by perplexity for `lm` and `sft`, by the policy's mean log-probability of
    the chosen and of the rejected answers for a preference objective's pairs (the rest of its
    metrics need its reference, which an export does not hold). They agree when the counts are the
    same and every figure is within `tolerance`, relative.
    """
    from transfer.evaluation.perplexity import perplexity
    from transfer.objectives import build_objective
    from transfer.objectives.base import TokenObjective
    from transfer.training.hardware import resolve

    out = Path(out).resolve()
    info = json.loads((out / EXPORT_RECORD).read_text())
    run_dir = Path(info["run"])
    record = read_run(run_dir)
    cfg = run_config(record, run_dir)
    expected = recorded_validation(record, info["weights"]["step"])
    model, tokenizer = load_export(out)
    objective = build_objective(cfg, tokenizer)
    if isinstance(objective, TokenObjective) and "perplexity" in expected:
        metrics, count = ("perplexity",), "tokens"
    elif not isinstance(objective, TokenObjective) and "chosen_logp" in expected:
        metrics, count = ("chosen_logp", "rejected_logp"), "examples"
    else:
        raise TransferError(
            f"--check: objective={cfg.objective.name} on this data has neither perplexity nor pairs to compare; "
            "allowed: lm, sft, and preference objectives on pairs"
        )
    validation = objective.prepare(cfg.eval.max_tokens)["validation"]
    hardware = resolve(cfg.hardware)
    model.to(hardware.device)
    if count == "tokens":
        measured = perplexity(model, validation, cfg.eval_batch_size, hardware, objective.pad_id, "check")
    else:
        measured = objective.policy_logps(model, validation, cfg.eval_batch_size, hardware)
    differences = {m: abs(measured[m] - expected[m]) / abs(expected[m]) for m in metrics}
    return {
        "metrics": list(metrics),
        "recorded": {m: expected[m] for m in metrics},
        "measured": {m: measured[m] for m in metrics},
        "relative_difference": max(differences.values()),
        "tolerance": tolerance,
        "count": count,
        "measured_count": measured[count],
        "recorded_count": expected.get(count),
        "precision": hardware.precision,
        "recorded_precision": (record.get("hardware") or {}).get("precision"),
        "agree": measured[count] == expected.get(count) and max(differences.values()) <= tolerance,
    }


def describe_check(result: dict) -> str:
    precision = result["precision"]
    if result["recorded_precision"] not in (None, precision):
        precision += f" (the run: {result['recorded_precision']})"
    figures = "; ".join(
        f"validation {m} {result['recorded'][m]:.6f} recorded, {result['measured'][m]:.6f} measured"
        for m in result["metrics"]
    )
    recorded = result["recorded_count"]
    return (
        f"check: {figures} (relative difference {result['relative_difference']:.2e}, tolerance "
        f"{result['tolerance']:.0e}; {result['measured_count']:,} {result['count']}, "
        f"{recorded if recorded is None else format(recorded, ',')} recorded; {precision}): "
        f"{'agree' if result['agree'] else 'DIFFER'}"
    )


# ---------------------------------------------------------------- the command
def main(argv: list[str] | None = None) -> int:
    from transfer.config.strategy import STRATEGIES

    parser = argparse.ArgumentParser(prog="python -m transfer.export", description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a completed run's folder (it holds metrics.json and checkpoints/)")
    mergeable = ", ".join(name for name, s in STRATEGIES.items() if s.mergeable)
    parser.add_argument("--merge", action="store_true", help=f"fold the adapter of {mergeable} into the base weights")
    parser.add_argument("--out", help="the folder to write (default: RUN/export, or RUN/export-merged with --merge)")
    parser.add_argument(
        "--weights", choices=("best", "last"), help="default: those of the run's final evaluation (eval.weights)"
    )
    parser.add_argument(
        "--check", action="store_true", help="compare the export's validation perplexity with the run's"
    )
    parser.add_argument("--tolerance", type=float, default=1e-4, help="--check's relative tolerance (default 1e-4)")
    args = parser.parse_args(argv)
    if not (args.tolerance >= 0 and math.isfinite(args.tolerance)):
        parser.error(f"--tolerance {args.tolerance}: allowed: a finite number >= 0")
    quiet_libraries()
    try:
        info = export(Path(args.run), args.merge, Path(args.out) if args.out else None, args.weights)
        what = f"{info['class']} {'merged model' if info['merged'] else 'model'}, {info['parameters']:,} parameters"
        if info["format"] == "adapter":
            what = (
                f"an adapter of {info['adapter_parameters']:,} parameters over its base, "
                f"{ADAPTER_BASE}/ ({info['class']}, {info['parameters']:,} parameters)"
            )
        print(f"wrote {fmt.where(info['out'])}: {what}", flush=True)  # export.json keeps the whole path
        if args.check:
            result = check_export(Path(info["out"]), args.tolerance)
            print(describe_check(result))
            return 0 if result["agree"] else 1
    except TransferError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def quiet_libraries() -> None:
    """The library notices a run silences, and the progress bars of loading a few small files."""
    import transformers

    from transfer.fmt import quiet_known_notices

    quiet_known_notices()
    transformers.utils.logging.disable_progress_bar()


if __name__ == "__main__":
    sys.exit(fmt.reader_may_leave(main))

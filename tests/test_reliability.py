"""Bad input and faults, as a new user meets them: one table of cases, each checked the same way.

Every case asserts the exit status, one line on the terminal that names the bad value or file,
no traceback, and that nothing on disk before it ran was lost or changed.

- The config-level cases run in one process (a subprocess of the tests) that calls the CLI
  once per case and in which importing torch fails: each must be refused before torch loads.
- The job-level cases and the faults run `python -m transfer` for real: they kill, corrupt
  and fill (a file-size limit, which needs no privilege, or a small tmpfs where the machine
  allows mounting one). A fault met only once data is read is raised in-process, where the
  loop meets it.
"""

import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from conftest import FAST, SHORT, SWEEP, assert_same_training, copy_run, run_cli, skip_or_fail
from omegaconf import OmegaConf

CORPUS = Path(__file__).resolve().parent.parent / "transfer" / "corpora" / "rust_concepts"
INSTRUCTIONS = Path(__file__).resolve().parent / "data" / "instructions.jsonl"
PAIRS = Path(__file__).resolve().parent / "data" / "pairs.jsonl"
UNPAIRED = [{"prompt": f"Q{i}?", "completion": f"A{i}.", "label": i % 2 == 0} for i in range(8)]  # KTO's own rows
# the arguments of the shared `fast_run` (conftest): a resumed or restarted run must end as it did
FAST_RUN = [*FAST, "log_interval=1", "checkpoint.interval=5", "checkpoint.keep=2"]


# ---------------------------------------------------------------- the cases
@dataclass
class Case:
    name: str
    args: list[str]
    message: str  # a piece of the one line the user sees
    make: object = None  # make(folder, fixtures) -> more args (or None to skip the case here)
    code: int = 2
    fixtures: list[str] = field(default_factory=list)


def _jsonl(folder: Path, name: str, rows) -> Path:
    path = folder / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _text_files(make_train):
    """A dataset=text_files case whose training file `make_train(folder)` writes."""

    def make(folder, fx):
        return ["dataset=text_files", f"dataset.train_files=[{make_train(folder)}]"]

    return make


def _write(name: str, data: bytes):
    def make_file(folder):
        (folder / name).write_bytes(data)
        return folder / name

    return make_file


def _good(folder: Path) -> Path:
    return _jsonl(folder, "good.jsonl", [{"text": f"Sentence {i} about borrowing in Rust."} for i in range(50)])


def _examples(bad: dict | None, every: dict | None = None):
    """A dataset=text_files case of 30 prompt/completion rows, line 8 replaced by `bad` (or each row by `every`)."""
    rows = [every or {"prompt": f"Question {i}?", "completion": f" Answer {i}."} for i in range(30)]
    if bad is not None:
        rows[7] = bad
    return _text_files(lambda folder: _jsonl(folder, "examples.jsonl", rows))


def _model_variant(change):
    """model.name_or_path=<a copy of a small saved model, changed by `change(folder)`>."""

    def make(folder, fx):
        model = folder / "model"
        shutil.copytree(fx["model_folder"], model)
        change(model)
        return [f"model.name_or_path={model}", "model.tokenizer_from_json=true"]

    return make


def _truncate(path: Path, keep: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _set_config(**values):
    def change(model):
        config = json.loads((model / "config.json").read_text())
        config.update(values)
        (model / "config.json").write_text(json.dumps(config))

    return change


def _record(status: str, config_from=None):
    """A run folder `run/` holding a record with `status` (and the config of a copied real run)."""

    def make(folder, fx):
        if config_from:
            copy_run(fx[config_from], folder / "run")
            record = json.loads((folder / "run" / "metrics.json").read_text())
            record["status"] = status
        else:
            (folder / "run").mkdir()
            record = {"status": status}
        (folder / "run" / "metrics.json").write_text(json.dumps(record))
        return []

    return make


def _parent_of_shape(init_from=None, **tiny):
    """run/: a completed run of the tiny model with its shape changed by `tiny`, started from `init_from`."""

    def make(folder, fx):
        from transfer.config.compose import compose_config

        config = OmegaConf.to_container(compose_config([]), resolve=True, enum_to_str=True)
        config["model"]["tiny"].update(tiny)
        config["init_from"] = init_from
        (folder / "run").mkdir()
        (folder / "run" / "metrics.json").write_text(json.dumps({"status": "completed", "config": config}))
        return []

    return make


def _garbled_record(folder, fx):
    (folder / "run").mkdir()
    (folder / "run" / "metrics.json").write_text('{"status": "ru')  # cut short
    return []


def _locked(folder, fx):
    """run/ locked by a live process: this test's own, holding the lock as a run would."""
    (folder / "run").mkdir()
    fd = os.open(folder / "run" / ".transfer.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": "now"}).encode())
    fx["held_locks"].append(fd)
    return []


def _read_only(folder, fx):
    """A read-only output folder: a read-only tmpfs for root, whom permissions do not stop."""
    target = folder / "ro"
    target.mkdir()
    if os.geteuid() != 0:
        target.chmod(0o555)
    elif subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(target)]).returncode != 0:
        return None
    else:
        fx["mounts"].append(target)
    return ["hydra.run.dir=ro/run"]


def _finished_sweep(folder, fx):
    copy_run(fx["two_job_sweep"], folder / "sweep")
    return [f"hydra.sweep.dir={folder / 'sweep'}"]


def _resume_path_without_checkpoint(folder, fx):
    (folder / "empty").mkdir()
    return [f"resume={folder / 'empty'}"]


NO_CUDA = not torch.cuda.is_available()
CONFIG_CASES = [
    # the command line
    Case("unknown option", ["strategy=fulll"], "unknown strategy 'fulll'; allowed: adapter, dora,"),
    Case("unknown key", ["optimizer.lrr=1e-3"], "unknown key 'optimizer.lrr'; allowed keys there: name, lr,"),
    Case("unknown key added with +", ["+optimizer.lrr=1e-4"], "unknown key 'optimizer.lrr'; allowed keys there"),
    Case("unknown top-level key added with +", ["+max_stepz=5"], "unknown key 'max_stepz'; allowed keys there: model,"),
    Case("value of the wrong type", ["optimizer.lr=abc"], "optimizer.lr: Value 'abc' of type 'str' could not be"),
    Case("value outside an enum", ["hardware.precision=fp8"], "hardware.precision: Invalid value 'fp8', expected one"),
    Case("override that does not parse", ["optimizer.lr=[1,"], "cannot parse overrides ['optimizer.lr=[1,']"),
    Case("_target_ from the command line", ["+hydra.callbacks.x._target_=builtins.open"], "sets _target_"),
    Case("_target_ inside a value", ["+hydra.callbacks.x={_target_: builtins.open}"], "sets _target_"),
    Case("old name n_layers (freeze_lower)", ["strategy=freeze_lower", "strategy.n_layers=2"],
         "strategy.n_layers was renamed: write strategy.frozen_blocks="),
    Case("old name n_layers (adapter)", ["strategy=adapter", "strategy.n_layers=1"],
         "strategy.n_layers was renamed: write strategy.trained_blocks="),
    Case("model=local without a path", ["model=local"], "model.name_or_path must be set"),
    Case("a model folder that does not exist", ["model=local", "model.name_or_path=/no/such/model"],
         "model.name_or_path='/no/such/model' does not exist; allowed: a model directory on disk or a hub name"),
    Case("a hub model offline, not in the cache", ["model=qwen2_0_5b"],
         "model.name_or_path='Qwen/Qwen2-0.5B' is not in the local Hugging Face cache, and the hub is unreachable "
         "(HF_HUB_OFFLINE is set)"),
    Case("text_files without files", ["dataset=text_files"], "dataset.train_files must be set"),
    Case("unknown experiment", ["-m", "+experiment=smok"], "unknown experiment 'smok'; allowed: qwen_strategies, replay_sweep,"),
    # ranges and combinations
    Case("no steps", ["max_steps=0"], "max_steps=0 must be at least 1"),
    Case("neither steps nor epochs", ["max_steps=null", "epochs=null"], "max_steps and epochs are both null"),
    Case("empty micro-batch", ["micro_batch_size=0"], "micro_batch_size=0 must be at least 1"),
    Case("zero learning rate", ["optimizer.lr=0"], "optimizer.lr=0.0 must be positive"),
    Case("warm-up longer than training", ["optimizer.warmup_steps=200"], "optimizer.warmup_steps=200 must be below"),
    Case("early stopping without validation", ["early_stopping.patience=3", "eval_interval=0"],
         "early_stopping.patience=3 needs validation during training"),
    Case("hold-out fraction above 1", ["dataset.holdout_fraction=1.5"], "dataset.holdout_fraction=1.5 must be in"),
    Case("evaluation of one token", ["eval.max_tokens=1"], "eval.max_tokens=1: allowed 2 or more"),
    Case("no threads", ["hardware.num_threads=0"], "hardware.num_threads=0 must be at least 1"),
    Case("negative loss chunks", ["hardware.loss_chunk_tokens=-1"], "hardware.loss_chunk_tokens=-1: allowed 0"),
    Case("no memory to use", ["hardware.memory_limit=0"], "hardware.memory_limit=0.0 must be a positive number of GiB"),
    Case("LoRA rank 0", ["strategy=lora", "strategy.r=0"], "strategy r=0, alpha=32, dropout=0.05: allowed r >= 1"),
    Case("bad last value of a sweep", ["-m", "optimizer.lr=1e-4,-1"], "optimizer.lr=-1.0 must be positive"),
    Case("a learning rate that is not a number", ["optimizer.lr=nan"], "optimizer.lr=nan: allowed a finite number"),
    Case("an infinite learning rate", ["optimizer.lr=inf"], "optimizer.lr=inf: allowed a finite number"),
    Case("an infinite value in a sweep", ["-m", "optimizer.weight_decay=0,inf"],
         "optimizer.weight_decay=inf: allowed a finite number"),
    Case("a block of one token", ["block_size=1"], "block_size=1 must be at least 2"),
    Case("a negative seed", ["seed=-1"], "seed=-1: allowed an integer 0..4294967295"),
    Case("a group's key in a sweep where one option lacks it", ["-m", "strategy=lora,full", "strategy.r=8"],
         "unknown key 'strategy.r'; allowed keys there: name"),
    # the machine
    Case("CUDA on a machine without", ["hardware=cuda"], "hardware.device=cuda but no CUDA device is available",
         make=lambda f, fx: [] if NO_CUDA else None),
    Case("fp16 on the CPU", ["hardware.precision=fp16"], "hardware.precision=fp16 on the CPU",
         make=lambda f, fx: [] if NO_CUDA else None),
    Case("QLoRA without CUDA", ["strategy=qlora"], "strategy=qlora needs a CUDA GPU",
         make=lambda f, fx: [] if NO_CUDA else None),
    # the model
    Case("block beyond the context", ["block_size=4096"], "block_size=4096 exceeds the context of tiny (1024 tokens)"),
    Case("more frozen blocks than the model has", ["strategy=freeze_lower", "strategy.frozen_blocks=9"],
         "strategy.frozen_blocks=9: allowed an integer 0..4, or a fraction of the depth in (0, 1) (the model has 4"),
    Case("more trained blocks than the model has", ["strategy=adapter", "strategy.trained_blocks=5"],
         "strategy.trained_blocks=5: allowed an integer 1..4 (the model has 4 blocks)"),
    Case("model folder without config.json", [], "no config.json in",
         make=_model_variant(lambda m: (m / "config.json").unlink()), fixtures=["model_folder"]),
    Case("model folder whose config.json is not JSON", [], "config.json is unreadable",
         make=_model_variant(lambda m: (m / "config.json").write_text("{not json")), fixtures=["model_folder"]),
    Case("model folder without weights", [], "no weights in",
         make=_model_variant(lambda m: (m / "model.safetensors").unlink()), fixtures=["model_folder"]),
    Case("model folder with truncated weights", [], "model.safetensors is corrupt (truncated:",
         make=_model_variant(lambda m: _truncate(m / "model.safetensors", 0.6)), fixtures=["model_folder"]),
    Case("model folder without a tokenizer", [], "no tokenizer in",
         make=_model_variant(lambda m: (m / "tokenizer.json").unlink()), fixtures=["model_folder"]),
    Case("block beyond a model folder's context", ["block_size=128"], "block_size=128 exceeds the context of",
         make=_model_variant(_set_config(max_position_embeddings=64)), fixtures=["model_folder"]),
    Case("frozen blocks beyond a model folder's depth", ["strategy=freeze_lower", "strategy.frozen_blocks=3"],
         "strategy.frozen_blocks=3: allowed an integer 0..2",
         make=_model_variant(lambda m: None), fixtures=["model_folder"]),
    # data files
    Case("missing data file", ["dataset=text_files", "dataset.train_files=[/nonexistent/train.jsonl]"],
         "dataset.train_files: no such file '/nonexistent/train.jsonl'"),
    Case("a folder given as a data file", [], "is not a file", make=_text_files(lambda f: f)),
    Case("unsupported file type", [], "has an unsupported type; allowed: .txt, .jsonl",
         make=_text_files(_write("notes.docx", b"PK\x03\x04"))),
    Case("empty file", [], "empty.jsonl' is empty", make=_text_files(_write("empty.jsonl", b""))),
    Case("whitespace-only file", [], "blank.txt' is only whitespace",
         make=_text_files(_write("blank.txt", b"  \n\n\t\n"))),
    Case("text that is not UTF-8", [], "latin1.txt' line 3 is not UTF-8 (byte 0xe9",
         make=_text_files(_write("latin1.txt", "one\ntwo\ncaf\xe9\n".encode("latin-1")))),
    Case("a JSON line that is not UTF-8", [], "line 2 is not UTF-8",
         make=_text_files(_write("bad.jsonl", b'{"text": "fine"}\n{"text": "caf\xe9"}\n'))),
    Case("a line that is not JSON", [], "broken.jsonl' line 2 is not JSON (Unterminated string",
         make=_text_files(_write("broken.jsonl", b'{"text": "fine"}\n{"text": "cut\n{"text": "fine"}\n'))),
    Case("a JSON line that is not an object", [], "line 2 is a JSON list, not an object",
         make=_text_files(_write("lists.jsonl", b'{"text": "a"}\n["a", "b"]\n'))),
    Case("a JSON array of strings", [], "holds a JSON str where an object with fields belongs",
         make=_text_files(_write("strings.json", b'["a", "b"]'))),
    Case("no such text field", ["dataset.text_field=body"], "has no field 'body'; allowed: text",
         make=lambda f, fx: ["dataset=text_files", f"dataset.train_files=[{_good(f)}]"]),
    Case("a text field with no text", [], "holds no text in its field 'text'",
         make=_text_files(lambda f: _jsonl(f, "blank.jsonl", [{"text": "  "}, {"text": ""}]))),
    Case("CSV without a header row", [], "a CSV file needs a header row",
         make=_text_files(_write("rows.csv", b"first sentence,1\nsecond sentence,2\n"))),
    Case("a Parquet file that is not one", [], "is not a Parquet file",
         make=_text_files(_write("fake.parquet", b"this is text, not parquet"))),
    Case("a JSON array cut short", [], "cut.json' line 2 is not JSON",
         make=_text_files(_write("cut.json", b'[{"text": "a"},\n {"text": '))),
    Case("empty validation file", [], "dataset.validation_files: ",
         make=lambda f, fx: ["dataset=text_files", f"dataset.train_files=[{_good(f)}]",
                             f"dataset.validation_files=[{_write('empty.jsonl', b'')(f)}]"]),  # fmt: skip
    Case("an example without its answer", ["objective=sft"], "examples.jsonl' line 8 has no 'completion'; it has: prompt",
         make=_examples({"prompt": "Q?"})),
    Case("an answer that is null", ["objective=sft"],
         "examples.jsonl' line 8: 'completion' is null; allowed: text or a list of messages",
         make=_examples({"prompt": "Q?", "completion": None})),
    Case("a prompt that is a number", ["objective=sft"], "examples.jsonl' line 8: 'prompt' is a number (7); allowed:",
         make=_examples({"prompt": 7, "completion": "Seven."})),
    Case("an answer that is an object", ["objective=sft"],
         "examples.jsonl' line 8: 'completion' is an object ({'text': 'A'}); allowed:",
         make=_examples({"prompt": "Q?", "completion": {"text": "A"}})),
    Case("a rejected answer that is null", ["objective=dpo"], "examples.jsonl' line 8: 'rejected' is null",
         make=_examples({"prompt": "Q?", "chosen": "Yes.", "rejected": None},
                        every={"prompt": "Q?", "chosen": "Yes.", "rejected": "No."})),
    Case("every answer empty", ["objective=sft"],
         "examples.jsonl': the answer of every one of its 30 rows is empty: nothing of an answer would be scored",
         make=_examples(None, every={"prompt": "Q?", "completion": ""})),
    Case("unknown python_docs part", ["eval.probes.python_docs.part=nope"],
         "eval.probes.python_docs.part='nope'; allowed: all, train, heldout"),
    Case("python_docs as instructions", ["eval.probes.python_docs.kind=instructions"],
         "eval.probes.python_docs.kind='instructions' with source=python_docs; allowed: text"),
    Case("probe without files", ["eval/probes=[python_docs,text_files]"], "eval.probes.text_files.files is empty; allowed"),
    Case("empty probe file", ["eval/probes=[wikitext]"], "eval.probes.wikitext.files: ",
         make=lambda f, fx: [f"eval.probes.wikitext.files=[{_jsonl(f, 'ref.jsonl', [{'text': ''}])}]"]),
    # output folders and resume
    Case("resume from a missing folder", ["resume=/nonexistent/run"], "resume='/nonexistent/run': no such folder"),
    Case("resume from a folder without checkpoints", [], "no checkpoint there",
         make=_resume_path_without_checkpoint),
    Case("resume=true without the run folder", ["resume=true"], "resume=true but outputs/"),
    Case("a completed run's folder", ["hydra.run.dir=run"], "run already holds a run (status completed)",
         make=_record("completed")),
    Case("a failed run's folder without resume", ["hydra.run.dir=run"], "run already holds a run (status failed)",
         make=_record("failed")),
    Case("an unreadable record met by resume", ["hydra.run.dir=run", "resume=true"], "metrics.json is unreadable",
         make=_garbled_record),
    Case("resume under another config", [*SHORT, "optimizer.lr=1e-2", "resume=true", "hydra.run.dir=run"],
         "resume: run was run with optimizer.lr=0.001, this run has optimizer.lr=0.01",
         make=_record("running", "short_run"), fixtures=["short_run"]),
    Case("a folder another run is writing", ["hydra.run.dir=run"], f"is in use by pid {os.getpid()} on",
         make=_locked),
    Case("a read-only output folder", [], "cannot write in the output folder", make=_read_only),
    Case("a finished sweep's folder without resume", ["-m", "optimizer.lr=1e-4,1e-3"], "already holds a sweep",
         make=_finished_sweep, fixtures=["two_job_sweep"]),
    Case("sweep resume under another config", [*SWEEP, "optimizer.lr=1e-2,1e-3", "resume=true"],
         "resume: job 0 of ", make=_finished_sweep, fixtures=["two_job_sweep"]),
    # objectives
    Case("instruction tuning on plain text", ["objective=sft"],
         "has none of the fields an example needs (prompt+completion, instruction+output, messages, conversations)"),
    Case("a task metric without choices", ["objective=sft", "objective.select=auc"],
         "objective.select='auc': allowed loss, perplexity; accuracy, auc and log_loss need dataset.choices",
         make=lambda f, fx: ["dataset=text_files", f"dataset.train_files=[{INSTRUCTIONS}]"]),
    Case("a task metric for language modelling", ["objective.select=accuracy"],
         "objective.select='accuracy': allowed loss, perplexity"),
    Case("one choice", ["objective=sft", "dataset.choices=[Yes]"], "dataset.choices=['Yes']: allowed two or more",
         make=lambda f, fx: ["dataset=text_files", f"dataset.train_files=[{INSTRUCTIONS}]"]),
    Case("a task's files not built yet", ["objective=sft", "dataset=movielens"],
         "no such file 'data/movielens/train.jsonl'; build them first: python -m transfer.tasks.movielens"),
    Case("a beta of zero", ["objective=dpo", "objective.beta=0"], "objective.beta=0.0 must be positive"),
    Case("label smoothing of one half", ["objective=dpo", "objective.label_smoothing=0.5"],
         "objective.label_smoothing=0.5: allowed [0, 0.5)"),
    Case("KTO with one answer a step", ["objective=kto", "micro_batch_size=1", "grad_accum_steps=1"],
         "objective=kto with micro_batch_size x grad_accum_steps = 1",
         make=lambda f, fx: ["dataset=text_files", f"dataset.train_files=[{PAIRS}]"]),
    Case("KTO judged by reward accuracy on unpaired rows", ["objective=kto", "objective.select=reward_accuracy"],
         "objective.select=reward_accuracy compares the two answers of a pair, and dataset.train_files holds unpaired",
         make=lambda f, fx: ["dataset=text_files", f"dataset.train_files=[{_jsonl(f, 'kto.jsonl', UNPAIRED)}]"]),
    Case("a cached reference for a method without one", ["objective=simpo", "objective.precompute_reference=true"],
         "objective.precompute_reference=true: simpo uses no reference model"),
    Case("preference optimisation on plain text", ["objective=dpo"],
         "has none of the fields an example needs (prompt+chosen+rejected)"),
    Case("pairs wanted, unpaired rows given", ["objective=dpo", "dataset=text_files"], "(prompt+chosen+rejected)",
         make=lambda f, fx: [f"dataset.train_files=[{_jsonl(f, 'kto.jsonl', [{'prompt': 'Q', 'completion': 'A', 'label': True}])}]"]),
    Case("init_from a folder without a run", [], "init_from=",
         make=lambda f, fx: [f"init_from={f}"]),
    Case("init_from an unfinished run", ["init_from=run"], "init_from='run': that run is running, not completed",
         make=_record("running")),
    Case("init_from a run of another model", [], "that run trained model 'other-org/other-model'",
         make=lambda f, fx: (_record("completed")(f, fx), (f / "run" / "metrics.json").write_text(json.dumps(
             {"status": "completed", "config": {"model": {"name_or_path": "other-org/other-model"}}})), [f"init_from={f / 'run'}"])[-1]),
    Case("init_from a run of another shape of model", ["init_from=run"],
         "init_from='run': that run trained model.tiny.num_layers=2, this one has model.tiny.num_layers=4: its weights "
         "would fill only part of this model", make=_parent_of_shape(num_layers=2)),
    Case("init_from a run whose own parent is gone", ["init_from=run"],
         "started from /nonexistent/grandparent (its init_from), which holds no run as seen from here",
         make=_parent_of_shape(init_from="/nonexistent/grandparent")),
]  # fmt: skip

DRIVER = r"""
import contextlib, io, json, os, sys
sys.path[:0] = sys.argv[1:]  # for the config-level cases, a torch that cannot be imported
from transfer import cli
results = {}
for case in json.load(sys.stdin):
    os.chdir(case["cwd"])
    sys.argv = ["transfer", *case["argv"]]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            cli.main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            import traceback
            traceback.print_exc()
            code = -1
    results[case["name"]] = {"code": code, "out": out.getvalue(), "err": err.getvalue(), "torch": "torch" in sys.modules}
print(json.dumps(results))
"""


def snapshot(folder: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file() and not p.is_symlink()}


def assert_nothing_lost(before: dict[Path, bytes], hydra_may_rewrite: bool = False) -> None:
    for path, data in before.items():
        assert path.is_file(), f"{path} is gone"
        if hydra_may_rewrite and path.parent.name == ".hydra":
            continue  # Hydra writes the job's config before the job starts; the same overrides, the same files
        if path.suffix == ".log":
            assert path.read_bytes().startswith(data), f"{path} lost lines"  # a log is appended to
            continue
        assert path.read_bytes() == data, f"{path} changed"


def one_error_line(output: str, message: str) -> str:
    assert "Traceback" not in output, output[-3000:]
    lines = [line for line in output.splitlines() if "error:" in line]
    assert len(lines) == 1, output[-3000:]
    assert message in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    """A small saved model (2 blocks, context 1024) with the byte tokenizer: what a user's folder holds."""
    from transfer.config.compose import compose_config
    from transfer.models.load import build_model, byte_tokenizer, tiny_config

    folder = tmp_path_factory.mktemp("model") / "tiny2"
    tokenizer = byte_tokenizer()
    tiny = compose_config(["model.tiny.num_layers=2", "model.tiny.hidden_size=64"]).model.tiny
    build_model(tiny_config(tiny, tokenizer), seed=0).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def config_results(tmp_path_factory, request):
    """Every config-level case, set up in its own folder and run through the CLI in one process without torch."""
    root = tmp_path_factory.mktemp("config_cases")
    poison = root / "poison" / "torch"
    poison.mkdir(parents=True)
    (poison / "__init__.py").write_text("raise ImportError('torch was imported before the command line was checked')\n")
    fx = {"held_locks": [], "mounts": []}
    cases, before = [], {}
    for i, case in enumerate(CONFIG_CASES):
        folder = root / f"case{i:02d}"
        folder.mkdir()
        for name in case.fixtures:
            fx[name] = request.getfixturevalue(name)
        extra = case.make(folder, fx) if case.make else []
        if extra is None:
            continue
        before[case.name] = (folder, snapshot(folder))
        cases.append({"name": case.name, "cwd": str(folder), "argv": [*case.args, *extra]})
    # an empty Hugging Face cache: a hub model is not there, whatever this machine holds
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_CACHE": str(root / "hub")}
    try:
        proc = subprocess.run([sys.executable, "-c", DRIVER, str(poison.parent)], input=json.dumps(cases),
                              capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    finally:
        for fd in fx["held_locks"]:
            os.close(fd)
        for target in fx["mounts"]:
            subprocess.run(["umount", str(target)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.splitlines()[-1])
    return {name: (results[name], *before[name]) for name in results}


@pytest.mark.parametrize("case", CONFIG_CASES, ids=[c.name for c in CONFIG_CASES])
def test_config_level_cases_are_refused_before_torch_in_one_line(case, config_results):
    if case.name not in config_results:
        skip_or_fail("cannot be made on this machine (a read-only folder for root needs a mount)")
    result, folder, before = config_results[case.name]
    assert result["code"] == case.code, result
    assert not result["torch"], "torch was imported"
    assert result["out"] == "" and "Traceback" not in result["err"], result
    assert result["err"].count("\n") == 1 and result["err"].startswith("error: "), result["err"]
    assert case.message in result["err"], result["err"]
    assert_nothing_lost(before)
    # nothing new either: no output folder, no lock left behind
    assert {p for p in folder.rglob("*") if p.is_file()} == set(before), "a refused run wrote files"


def test_the_table_holds_fifty_cases_or_more():
    faults = [name for name in globals() if name.startswith("test_fault_") or name.startswith("test_job_level_")]
    assert len(CONFIG_CASES) + len(JOB_CASES) + len(faults) >= 50


# ---------------------------------------------------------------- cases that need the job
JOB_CASES = [
    Case("a run far too big for the memory", ["hardware=cpu", "micro_batch_size=4096", "hardware.memory_limit=1", "hardware.estimate_memory=true"],
         "is more than 2x the 1 GiB available on cpu; to fit: micro_batch_size=256 grad_accum_steps=16", code=1),
    Case("a LoRA target the model lacks", ["strategy=lora", "strategy.target_modules=[qkv]"],
         "'qkv' matches no linear projection of Qwen2ForCausalLM; allowed: down_proj, gate_proj,", code=1),
    Case("a document separator the tokenizer lacks", ["objective.separator='<|nope|>'"],
         "objective.separator='<|nope|>' is no token of this tokenizer; allowed: eos, none, or one of <|endoftext|>",
         code=1),
    Case("the chat template of a tokenizer without one", ["objective=sft", "objective.template=chat"],
         "objective.template=chat but this tokenizer has no chat template; allowed: auto, plain, none", code=1,
         make=lambda f, fx: ["dataset=text_files", f"dataset.train_files=[{INSTRUCTIONS}]"]),
    Case("an answer that is not one of the choices", ["objective=sft", "dataset.choices=[Yes,No]"],
         "validation.jsonl' line 2: the answer 'Maybe' is not one of dataset.choices ['Yes', 'No']", code=1,
         make=lambda f, fx: ["dataset=text_files", *(f"dataset.{s}_files=[{_jsonl(f, s + '.jsonl', rows)}]"
                             for s, rows in (("train", [{"prompt": "Q?", "completion": "Yes"}] * 30),
                                             ("validation", [{"prompt": "Q?", "completion": "No"},
                                                             {"prompt": "Q?", "completion": "Maybe"}]),
                                             ("test", [{"prompt": "Q?", "completion": "No"}])))]),
]  # fmt: skip


@pytest.fixture(scope="module")
def job_results(tmp_path_factory) -> dict[str, tuple[dict, Path]]:
    """Every job-level case in its own folder, run through the CLI one after another in one process (the DRIVER's):
    the process's start-up, seconds of imports, is paid once rather than once a case."""
    root = tmp_path_factory.mktemp("job_cases")
    cases, folders = [], {}
    for i, case in enumerate(JOB_CASES):
        folder = folders[case.name] = root / f"case{i:02d}"
        folder.mkdir()
        extra = case.make(folder, {}) if case.make else []
        cases.append({"name": case.name, "cwd": str(folder), "argv": [*SHORT, *case.args, *extra, "hydra.run.dir=run"]})
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", DRIVER], input=json.dumps(cases), capture_output=True, text=True,
                          env=env, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.splitlines()[-1])
    return {name: (results[name], folders[name]) for name in results}


@pytest.mark.parametrize("case", JOB_CASES, ids=[c.name for c in JOB_CASES])
def test_job_level_cases_are_one_line_and_recorded(case, job_results):
    result, folder = job_results[case.name]
    assert result["code"] == case.code, result
    line = one_error_line(result["out"] + result["err"], case.message)
    record = json.loads((folder / "run" / "metrics.json").read_text())
    assert record["status"] == "failed" and record["error"] in line


# ---------------------------------------------------------------- faults
def _resume(run: Path, cwd: Path, args=FAST_RUN) -> subprocess.CompletedProcess:
    return run_cli([*args, "resume=true", f"hydra.run.dir={run}"], cwd)


def _as_killed(run: Path) -> None:
    """The record as a run killed in training leaves it."""
    record = json.loads((run / "metrics.json").read_text())
    (run / "metrics.json").write_text(json.dumps({**record, "status": "running"}))


def _rewrite_manifest(folder: Path) -> None:
    """As someone who changes a checkpoint and its checksums together would."""
    import hashlib

    manifest = json.loads((folder / "manifest.json").read_text())
    for name in manifest["files"]:
        data = (folder / name).read_bytes()
        manifest["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (folder / "manifest.json").write_text(json.dumps(manifest))


class Evil:
    """What a crafted trainer_state.pt holds: unpickling it runs a command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("handed", [False, True], ids=["own-folder", "handed-over"])
def test_fault_a_crafted_trainer_state_runs_no_code(short_run, tmp_path, handed):
    run = copy_run(short_run, tmp_path / "run")
    _as_killed(run)
    marker = tmp_path / "code-ran"
    state = run / "checkpoints" / "step-000010" / "trainer_state.pt"
    torch.save({"progress": Evil(marker)}, state)
    _rewrite_manifest(state.parent)  # its checksums made to match: only the loader can refuse it
    before = snapshot(tmp_path)
    args = [*SHORT, f"resume={run}", "hydra.run.dir=other"] if handed else [*SHORT, "resume=true", "hydra.run.dir=run"]
    proc = run_cli(args, tmp_path)
    assert proc.returncode == 1
    one_error_line(proc.stdout + proc.stderr, "holds objects other than tensors and plain values")
    assert not marker.exists(), "the pickle ran"
    assert_nothing_lost(before, hydra_may_rewrite=True)


CRAFTED_SHARDS = {  # what a crafted sharded checkpoint does -> what the refusal names
    "code in the metadata": "names posix.system",
    "a pickled entry": "names torch.distributed.checkpoint.metadata.BytesStorageMetadata",
    "tensors read from elsewhere": "points to '../elsewhere.distcp'",
    "state set on a class": "names state for Metadata",
    "torch's fallback to a rank's metadata": "is no checkpoint metadata",
}


@pytest.mark.parametrize("craft", list(CRAFTED_SHARDS))
def test_fault_crafted_shards_run_no_code(tmp_path, craft):
    """torch.distributed.checkpoint reads .metadata with plain pickle (and, when that fails, a rank's own
    __<rank>.metadata), and a non-tensor entry with torch.load(weights_only=False): a crafted sharded checkpoint is
    refused before torch reads any of it, and nothing it names runs."""
    import pickle
    import warnings

    import torch.distributed.checkpoint as dcp

    from transfer.config.compose import compose_config
    from transfer.errors import TransferError, UnsafeCheckpoint
    from transfer.models.load import load_model_and_tokenizer
    from transfer.training.checkpoint import SHARDS, damage, load_weights

    cfg = compose_config(["model=tiny_random"])
    model, _ = load_model_and_tokenizer(cfg.model, 64)
    folder, marker = tmp_path / "step-000010", tmp_path / "code-ran"
    shards, metadata = folder / SHARDS, folder / SHARDS / ".metadata"
    state = {"model": model.state_dict()}
    if craft == "a pickled entry":
        state["extra"] = Evil(marker)  # saved as bytes; torch would unpickle it on load
    with warnings.catch_warnings():  # torch's notice that it saves in one process: its words, not ours to check
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=str(shards))
    if craft == "code in the metadata":
        metadata.write_bytes(pickle.dumps(Evil(marker)))
    elif craft == "tensors read from elsewhere":
        genuine = pickle.loads(metadata.read_bytes())
        for info in genuine.storage_data.values():
            info.relative_path = "../elsewhere.distcp"
        metadata.write_bytes(pickle.dumps(genuine))
    elif craft == "state set on a class":  # a BUILD on the Metadata class itself
        metadata.write_bytes(b"ctorch.distributed.checkpoint.metadata\nMetadata\n}S'crafted'\nI1\nsb.")
    elif craft == "torch's fallback to a rank's metadata":
        metadata.write_bytes(pickle.dumps(0))  # unpickles, but is no metadata: torch would then read __0.metadata
        (shards / "__0.metadata").write_bytes(pickle.dumps(Evil(marker)))
    refused = CRAFTED_SHARDS[craft]
    if craft == "torch's fallback to a rank's metadata":  # merely damaged: a resume falls back past it
        assert refused in damage(folder)
        with pytest.raises(TransferError, match=refused):
            load_weights(folder, model)
    else:
        for check in (damage, lambda folder: load_weights(folder, model)):
            with pytest.raises(
                UnsafeCheckpoint,
                match=rf"\.metadata {refused}[^:]*: the metadata of a checkpoint of ours never does; refused",
            ):
                check(folder)
    from torch.distributed.checkpoint.metadata import Metadata

    assert not marker.exists(), "the pickle ran"
    assert not hasattr(Metadata, "crafted")


def test_fault_kto_judged_by_a_pair_metric_on_unpaired_rows_read_at_run_time(tmp_path):
    """Rows from the hub are known only once read: KTO with objective.select=reward_accuracy on unpaired rows is
    one line at the start of training (its validation has no pairs to compare), not a KeyError."""
    from transfer.config.compose import compose_config
    from transfer.errors import TransferError
    from transfer.models.load import load_model_and_tokenizer
    from transfer.objectives import build_objective
    from transfer.train import train
    from transfer.training.hardware import resolve

    rows = _jsonl(tmp_path, "kto.jsonl", UNPAIRED * 4)
    cfg = compose_config(["objective=kto", "objective.select=reward_accuracy", "dataset=text_files",
                          f"dataset.train_files=[{rows}]", "block_size=64", "max_steps=2", "micro_batch_size=2"])  # fmt: skip
    model, tokenizer = load_model_and_tokenizer(cfg.model, cfg.block_size)
    objective = build_objective(cfg, tokenizer)
    splits = objective.prepare(cfg.eval.max_tokens)
    hardware = resolve(cfg.hardware)
    objective.attach(model, splits, cfg, hardware)
    baseline = objective.evaluate(model, splits["validation"], 8, hardware, "baseline")
    with pytest.raises(TransferError) as e:
        train(model, objective, splits, cfg, hardware, baseline=baseline)
    assert str(e.value) == (
        "objective.select=reward_accuracy: the validation split gives no reward_accuracy (its rows are unpaired: "
        "no pair to compare); allowed with this data: loss"
    )


def test_fault_checkpoints_without_their_record_resume(short_run, tmp_path):
    """A run folder whose metrics.json is gone: resume=true goes on from the checkpoints, whose own configs are
    compared with this run's, and writes the record anew."""
    run = copy_run(short_run, tmp_path / "run")
    (run / "metrics.json").unlink()
    proc = _resume(run, tmp_path, args=SHORT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    resumed = json.loads((run / "metrics.json").read_text())
    assert resumed["status"] == "completed" and resumed["train"]["resumed_from_step"] == 10
    assert_same_training(resumed, json.loads((short_run / "metrics.json").read_text()))


def test_fault_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(fast_run, tmp_path):
    run = copy_run(fast_run, tmp_path / "run")
    _as_killed(run)
    weights = run / "checkpoints" / "step-000030" / "trainable.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2 :] = bytes(len(data) - len(data) // 2)  # the second half zeroed
    weights.write_bytes(bytes(data))
    proc = _resume(run, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    assert "step-000030 is damaged: trainable.safetensors: its checksum differs" in output
    assert "falling back to step-000025" in output
    resumed = json.loads((run / "metrics.json").read_text())
    assert resumed["status"] == "completed" and resumed["train"]["resumed_from_step"] == 25
    assert_same_training(resumed, json.loads((fast_run / "metrics.json").read_text()))


def test_fault_no_intact_checkpoint_refuses_with_each_problem(fast_run, tmp_path):
    run = copy_run(fast_run, tmp_path / "run")
    _as_killed(run)
    newest, older = (run / "checkpoints" / f"step-0000{s}" for s in (30, 25))
    _truncate(newest / "trainable.safetensors", 0.5)
    from safetensors.torch import load_file, save_file

    tensors = load_file(older / "trainable.safetensors")
    tensors = {k: torch.full_like(v, math_nan()) for k, v in tensors.items()}
    save_file(tensors, older / "trainable.safetensors")
    _rewrite_manifest(older)  # NaN weights under matching checksums: the values are checked too
    before = snapshot(tmp_path)
    proc = _resume(run, tmp_path)
    assert proc.returncode == 1
    line = one_error_line(proc.stdout + proc.stderr, "resume: no intact checkpoint in")
    assert "step-000030/trainable.safetensors: " in line and "(truncated?)" in line
    assert "step-000025/trainable.safetensors: " in line and "holds NaN or infinite values" in line
    assert_nothing_lost(before, hydra_may_rewrite=True)


def math_nan() -> float:
    return float("nan")


def test_fault_second_writer_refused_then_stale_lock_taken_over_and_restart_from_zero(fast_run, tmp_path):
    """A run is writing; a second into its folder is refused naming it; it is killed; a resume takes its place."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    first = subprocess.Popen([sys.executable, "-m", "transfer", *FAST_RUN, "hydra.run.dir=run"], cwd=tmp_path,
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.time() + 120
        while not (tmp_path / "run" / "metrics.json").is_file() and time.time() < deadline:
            time.sleep(0.05)
        second = run_cli([*FAST_RUN, "hydra.run.dir=run"], tmp_path)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert second.returncode == 2
    assert second.stderr.startswith(f"error: {tmp_path / 'run'} is in use by pid {first.pid} on ")
    assert second.stderr.count("\n") == 1
    # killed before its first checkpoint (as if): a resume starts again from step 0, and says so
    shutil.rmtree(tmp_path / "run" / "checkpoints", ignore_errors=True)
    proc = _resume(tmp_path / "run", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    assert f"took over the lock of pid {first.pid} on " in output
    assert "has no checkpoint; starting from step 0" in output
    assert "Traceback" not in output
    again = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert again["status"] == "completed" and again["train"]["resumed_from_step"] is None
    assert_same_training(again, json.loads((fast_run / "metrics.json").read_text()))
    assert not (tmp_path / "run" / ".transfer.lock").exists()
    # TensorBoard shows the new run's steps once each, whatever the killed one had logged
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "run"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 31))
    assert [e.step for e in events.Scalars("validation/loss")] == [0, 10, 20, 30]


def _run_until(args: list[str], cwd: Path, ready) -> subprocess.Popen:
    """Start `python -m transfer`; return once `ready(line)` holds for a line it logged."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "transfer", *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    for line in proc.stdout:
        if ready(line):
            return proc
    raise AssertionError(f"the run ended first: {proc.wait()} {proc.stderr.read()[-3000:]}")


def test_fault_ctrl_c_records_interrupted_and_prints_how_to_resume(fast_run, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    proc = _run_until([*FAST_RUN, "hydra.run.dir=run"], tmp_path, lambda line: "step 3/30" in line)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert "Traceback" not in out + err
    note, line = [line for line in err.splitlines() if line.strip()]  # the note that it will stop, then the line
    assert note.startswith("stopping after this step")
    assert line.startswith("interrupted (Ctrl-C); continue with: python -m transfer ")
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert record["status"] == "interrupted" and "resume it with resume=true" in record["error"]
    stopped = int(next(p.name for p in (tmp_path / "run" / "checkpoints").glob("step-*"))[-6:])
    assert stopped >= 3  # it stopped at a step boundary, with a checkpoint there
    command = line.split("continue with: ", 1)[1]
    resumed = run_cli(__import__("shlex").split(command)[3:], tmp_path)  # the printed command, as written
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    again = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert again["train"]["resumed_from_step"] == stopped
    assert_same_training(again, json.loads((fast_run / "metrics.json").read_text()))
    # TensorBoard shows each step once: what the interrupted run logged after its checkpoint is purged
    events = EventAccumulator(str(tmp_path / "run"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 31))
    assert [e.step for e in events.Scalars("validation/loss")] == [0, 10, 20, 30]


def test_fault_sigterm_while_loading_records_interrupted(tmp_path):
    proc = _run_until([*SHORT, "hydra.run.dir=run"], tmp_path, lambda line: "parameters train" in line)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in out + err
    *notes, line = [line for line in err.splitlines() if line.strip()]
    assert line.startswith("terminated (SIGTERM); continue with: python -m transfer ")
    assert all(n.startswith("stopping after this step") for n in notes)  # if it reached training first
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["status"] == "interrupted"


def files_at_most(limit: int):
    """A subprocess's preexec_fn: it may write no file past `limit` bytes, which is what a full disk does to a write,
    with no root and no mount; SIGXFSZ ignored, so such a write fails with EFBIG ("File too large")."""

    def limit_files() -> None:
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    return limit_files


@pytest.mark.parametrize("what", ["a resumed run", "a sweep"])
def test_fault_a_full_disk_while_hydra_writes_its_files_is_one_line_and_loses_nothing(tmp_path, what):
    """Hydra writes a job's .hydra/ files (and a sweep's multirun.yaml) before the job starts, truncating the old
    ones first. A file-size limit (RLIMIT_FSIZE: unprivileged, where a full disk needs a mount) stops those writes
    as a full disk would: one line naming the file or folder, exit 1, and the resumed folder's files as they were,
    none cut short, no temporary left."""
    import resource

    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("seed: 1234\n")  # what the interrupted run's Hydra wrote
    (run / "metrics.json").write_text(json.dumps({"status": "running"}))
    before = snapshot(tmp_path)
    limit = 1024  # the lock file (its holder, in JSON) fits; a composed config does not

    def small_disk():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    if what == "a sweep":  # its multirun.yaml, written by Hydra's sweeper
        args = ["-m", *SHORT, "optimizer.lr=1e-3,1e-4", "hydra.sweep.dir=sweep"]
        message = "cannot write in the output folder sweep (File too large)"
    else:
        args = [*SHORT, "resume=true", "hydra.run.dir=run"]
        message = f"cannot write {run / '.hydra' / 'config.yaml'} (File too large); nothing was run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run([sys.executable, "-m", "transfer", *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300, preexec_fn=small_disk)  # fmt: skip
    assert proc.returncode == 1
    line = one_error_line(proc.stdout + proc.stderr, message)
    assert "free space there, or choose another output folder" in line
    assert_nothing_lost(before)
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and p.suffix == ".tmp"], "a temporary file was left"


def test_fault_a_full_disk_is_one_line_and_leaves_no_temporary_folder(tmp_path):
    import errno

    # the tiny model's trainable weights alone are 3.3 MB; the record, logs and events fit in 1 MB
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "transfer", *SHORT, "hydra.run.dir=run"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300, preexec_fn=files_at_most(2**20))  # fmt: skip
    assert proc.returncode == 1
    line = one_error_line(proc.stdout + proc.stderr, f"cannot write the checkpoint {tmp_path / 'run' / 'checkpoints'}")
    # the cause in the system's words (a writer's own wording around it is its own), then what to do
    assert os.strerror(errno.EFBIG) in line and line.endswith("; free space there, or set checkpoint.enabled=false")
    assert not list((tmp_path / "run").rglob("*.tmp")), "a temporary folder was left behind"
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert record["status"] == "failed" and record["error"] == line.split("error: ", 1)[1]


@contextlib.contextmanager
def file_size_limit(limit: int):
    """files_at_most in this process, for a call made in-process: no file written past `limit` bytes meanwhile."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def _sweep_of_records(folder: Path) -> Path:
    """Three finished jobs' records, as run.py writes their fields (no training): strategy x learning rate."""
    for number, (strategy, lr, val) in enumerate([("full", 1e-3, 10.0), ("full", 1e-4, 12.0), ("lora", 1e-3, 11.0)]):
        record = {"status": "completed", "overrides": [f"strategy={strategy}", f"optimizer.lr={lr}"],
                  "choices": {"strategy": strategy, "model": "tiny", "dataset": "rust_concepts"},
                  "config": {"seed": 1, "strategy": {"name": strategy}, "optimizer": {"lr": lr}},
                  "train": {"seconds": 1.0, "steps": 10},
                  "eval": {"final": {"validation": {"perplexity": val}}}}  # fmt: skip
        (folder / str(number)).mkdir(parents=True)
        (folder / str(number) / "metrics.json").write_text(json.dumps(record))
    return folder


def test_fault_a_full_disk_while_the_tables_are_written_keeps_the_earlier_tables(tmp_path, capsys):
    """The first files fit, a plot does not: the earlier tables stay whole, no 0-byte or half-new comparison.md."""
    from transfer.aggregate.__main__ import main

    sweep, out = _sweep_of_records(tmp_path / "sweep"), tmp_path / "tables"
    assert main([str(sweep), "--out", str(out), "--sort", "train_seconds"]) == 0
    before = snapshot(out)
    assert {p.name for p in before} >= {"comparison.md", "jobs.parquet", "ci_val_ppl_after.png"}
    capsys.readouterr()
    with file_size_limit(4096):  # the Markdown and CSV tables are smaller; each plot is larger
        code = main([str(sweep), "--out", str(out)])  # sorted otherwise: every table would change
    assert code == 2
    printed = capsys.readouterr()
    line = one_error_line(printed.out + printed.err, f"error: cannot write the tables into {out} (File too large); ")
    assert line.endswith("the earlier ones there are kept: free space there, or write them elsewhere (--out)")
    assert_nothing_lost(before)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in before), "a temporary file was left"
    with file_size_limit(4096):  # a first aggregation: nothing, rather than a part
        assert main([str(sweep), "--out", str(tmp_path / "new")]) == 2
    assert list((tmp_path / "new").iterdir()) == []


def test_fault_the_aggregator_counts_only_records_that_hold_results(tmp_path, capsys):
    """A record that says completed and holds nothing else, a pruned one without its training: not results.
    And a file named where a sweep folder goes."""
    from transfer.aggregate.__main__ import main

    sweep = _sweep_of_records(tmp_path / "sweep")
    (sweep / "3" / ".hydra").mkdir(parents=True)
    (sweep / "3" / ".hydra" / "overrides.yaml").write_text("- strategy=lora\n- optimizer.lr=0.0001\n")
    (sweep / "3" / "metrics.json").write_text('{"status": "completed"}')
    (sweep / "4").mkdir()
    (sweep / "4" / "metrics.json").write_text('{"status": "pruned", "config": {"seed": 1}}')
    before = snapshot(sweep)
    assert main([str(sweep), "--out", str(tmp_path / "tables")]) == 0
    assert "5 jobs (3 completed, 2 unreadable)" in capsys.readouterr().out
    import pandas as pd

    table = pd.read_csv(tmp_path / "tables" / "comparison.csv")
    assert table["status"].tolist() == ["completed"] * 3 + ["unreadable"] * 2 and table["seeds"].sum() == 3
    assert table["error"].tolist()[3:] == ["metrics.json says completed but has no config, train, eval.final",
                                           "metrics.json says pruned but has no train"]  # fmt: skip
    best = pd.read_csv(tmp_path / "tables" / "best_per_strategy.csv")  # lora's one completed group, not the empty one
    assert best.set_index("strategy").at["lora", "candidates"] == 1
    assert_nothing_lost(before)
    record = sweep / "0" / "metrics.json"
    assert main([str(record)]) == 2
    printed = capsys.readouterr()
    assert one_error_line(printed.out + printed.err, "error: ") == (
        f"error: {str(record)!r} is a file; allowed: a sweep folder (multirun/<date>/<time>), which holds the jobs' folders"
    )


def test_safetensors_framing_problems_are_named():
    """The framing check behind the model-folder and checkpoint cases, on the bytes themselves."""
    from transfer.config.model import safetensors_problem

    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    whole = struct.pack("<Q", len(header)) + header + bytes(8)
    folder = Path(os.environ.get("TMPDIR", "/tmp")) / f"st-{os.getpid()}"
    folder.mkdir(exist_ok=True)
    for data, problem in [
        (whole, None),
        (whole[:-3], "truncated: "),
        (whole[:5], "shorter than a header"),
        (struct.pack("<Q", 10**9) + header, "header of 1,000,000,000 bytes"),
    ]:
        (folder / "w.safetensors").write_bytes(data)
        found = safetensors_problem(folder / "w.safetensors")
        assert (found is None) if problem is None else (problem in found), found
    shutil.rmtree(folder)

"""The dataset group, the forgetting probes and replay: where a run's text comes from, how its rows are read,
and the checks of those settings (the files themselves are read by config.preflight)."""

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf

from transfer.config import preflight
from transfer.config.objective import OBJECTIVES, Template
from transfer.errors import TransferError

# the parts of the Python documentation's prose (transfer/data/sources.py): every topic, or two disjoint ones
PYTHON_DOCS_PARTS = ("all", "train", "heldout")


class TxtSampleBy(Enum):
    paragraph = "paragraph"
    line = "line"
    document = "document"


class ExampleFormat(Enum):
    auto = "auto"
    prompt_completion = "prompt_completion"
    alpaca = "alpaca"
    messages = "messages"
    pairs = "pairs"  # prompt, chosen, rejected (preference objectives)
    unpaired = "unpaired"  # prompt, completion, label (KTO)


@dataclass
class ExampleFields:
    """Rows of examples (objective=sft, an instructions probe): their format and the names of their fields
    (transfer/data/chat.py). ShareGPT's "conversations" is found as well as messages_field."""

    format: ExampleFormat = ExampleFormat.auto
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    instruction_field: str = "instruction"
    input_field: str = "input"
    output_field: str = "output"
    messages_field: str = "messages"


@dataclass
class DatasetConfig(ExampleFields):
    name: str = MISSING
    text_field: str = "text"
    # A split the source lacks is carved out of the training documents.
    holdout_fraction: float = 0.05
    # Fixed apart from the run seed: every job of a sweep sees the same splits.
    split_seed: int = 0
    # Greedy generations from these prompts are recorded before and after training.
    prompts: list[str] = field(default_factory=list)
    # A task's answers, e.g. ["Yes", "No"]: each is scored after the prompt (accuracy, log-loss, AUC).
    choices: list[str] | None = None
    # The field that holds the right choice (null: the answer itself); for KTO's unpaired rows,
    # whether the completion is desirable (null: "label").
    label_field: str | None = None
    chosen_field: str = "chosen"
    rejected_field: str = "rejected"
    # How this data's text is framed: null, as the objective says (objective.template); none,
    # written already as the model should see it (a transcript such as HH-RLHF's).
    template: Template | None = None
    # How to make the files when they are missing (a task's builder), said with the error.
    build_hint: str | None = None
    # What sort of text this is (e.g. "technical documentation"): a forgetting probe of the same genre is
    # flagged, since its fall is transfer, not an absence of forgetting.
    genre: str | None = None
    # Replay against forgetting (objective lm): this fraction of the training rows are blocks of
    # general text; of the first j rows, exactly floor(j * replay). transfer/data/replay.py. 0: none.
    replay: float = 0.0
    # Replay's text: python_docs (the Python documentation's topics that no forgetting probe scores),
    # or a list of .txt/.jsonl/.json/.csv/.parquet files, their text in text_field.
    replay_source: Any = "python_docs"


@dataclass
class TextFilesDataset(DatasetConfig):
    """Local .txt/.jsonl/.json/.csv/.parquet files, read by the `datasets` library."""

    train_files: list[str] = MISSING
    validation_files: list[str] = field(default_factory=list)
    test_files: list[str] = field(default_factory=list)
    txt_sample_by: TxtSampleBy = TxtSampleBy.paragraph


@dataclass
class HubDataset(DatasetConfig):
    """A dataset on the Hugging Face hub."""

    path: str = MISSING
    config_name: str | None = None
    revision: str | None = None
    train_split: str = "train"
    validation_split: str | None = "validation"
    test_split: str | None = "test"


# options of the group -> the schema class their YAML names (schema/dataset/<option>)
SCHEMA = {"text_files": TextFilesDataset, "hub": HubDataset}


class ProbeSource(Enum):
    python_docs = "python_docs"
    files = "files"
    hub = "hub"


class ProbeKind(Enum):
    text = "text"
    instructions = "instructions"


@dataclass
class ProbeConfig(ExampleFields):
    """Text scored before and after training: what a strategy made the model forget (eval.probes).

    `text`: raw text, every token scored. `instructions`: instruction examples, framed by the
    model's chat template (or the plain one for a model without), only the answers scored: the
    forgetting that matters for an Instruct model. Rows are read like a dataset's (ExampleFields).
    """

    source: ProbeSource = ProbeSource.python_docs
    kind: ProbeKind = ProbeKind.text
    # What sort of text it is; a probe of the training data's own genre measures transfer, not forgetting,
    # when its perplexity falls (the tables and plots say so when it equals dataset.genre).
    genre: str | None = None
    # Score at most this many tokens (the first ones, so always the same); null = all.
    max_tokens: int | None = 65536
    part: str = "heldout"  # source=python_docs: the topics the tiny model never saw (transfer/data/sources.py)
    files: list[str] = field(default_factory=list)  # source=files
    txt_sample_by: TxtSampleBy = TxtSampleBy.paragraph
    path: str | None = None  # source=hub
    config_name: str | None = None
    revision: str | None = None
    split: str = "test"
    text_field: str = "text"


def label_fields(cfg) -> tuple[str, ...]:
    """The fields of a dataset's rows that hold a label (KTO's: desirable or not), not text."""
    return (cfg.get("label_field") or "label",)


def check_dataset(cfg: DictConfig) -> None:
    if not 0 <= cfg.dataset.holdout_fraction < 1:
        raise TransferError(f"dataset.holdout_fraction={cfg.dataset.holdout_fraction} must be in [0, 1)")
    check_replay(cfg)


def check_replay(cfg: DictConfig) -> None:
    """dataset.replay: a fraction for an objective that replays; its source python_docs or files no probe scores."""
    replay, source = cfg.dataset.replay, cfg.dataset.replay_source
    if not 0 <= replay < 1:
        raise TransferError(f"dataset.replay={replay}: allowed a fraction of the training rows in [0, 1)")
    if replay and not OBJECTIVES[cfg.objective.name].replay:
        raise TransferError(
            f"dataset.replay={replay} mixes blocks of text into objective=lm's training; "
            f"objective={cfg.objective.name} allows only 0"
        )
    files = list(source) if OmegaConf.is_list(source) else None
    if source != "python_docs" and not (files and all(isinstance(f, str) for f in files)):
        raise TransferError(
            f"dataset.replay_source={source!r}: allowed python_docs, or a list of .txt/.jsonl/.json/.csv/.parquet files"
        )
    for name, probe in cfg.eval.probes.items() if replay else ():
        shared = sorted(_resolved(files or []) & _resolved(list(probe.files)))
        if shared:
            raise TransferError(
                f"dataset.replay_source holds {shared[0]}, which probe {name!r} scores; allowed: text that no probe scores"
            )
        if source == "python_docs" and probe.source.value == "python_docs" and probe.part != "heldout":
            raise TransferError(
                f"dataset.replay_source=python_docs trains on topics that probe {name!r} scores (part={probe.part}); "
                "allowed: that probe's part=heldout, or replay files"
            )


def _resolved(paths: list[str]) -> set[str]:
    return {str(Path(p).expanduser().resolve()) for p in paths}


def check_probes(probes: DictConfig) -> None:
    """Each probe's source has what it reads, and its files hold the fields its kind needs."""
    for name, probe in probes.items():
        if probe.source.value == "files" and not probe.files:
            raise TransferError(
                f"eval.probes.{name}.files is empty; allowed: a list of .txt/.jsonl/.json/.csv/.parquet files"
            )
        if probe.source.value == "hub" and not probe.path:
            raise TransferError(f"eval.probes.{name}.path is not set; allowed: a hub dataset name")
        if probe.source.value == "python_docs" and probe.kind.value != "text":
            raise TransferError(f"eval.probes.{name}.kind={probe.kind.value!r} with source=python_docs; allowed: text")
        if probe.source.value == "python_docs" and probe.part not in PYTHON_DOCS_PARTS:
            raise TransferError(f"eval.probes.{name}.part={probe.part!r}; allowed: {', '.join(PYTHON_DOCS_PARTS)}")
        if probe.source.value == "files":
            # an instructions probe's rows are read as sft's examples
            needs = OBJECTIVES["sft"].fields(probe) if probe.kind.value == "instructions" else [(probe.text_field,)]
            preflight.check_data_files(list(probe.files), f"eval.probes.{name}.files", needs)

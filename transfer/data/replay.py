"""Replay against forgetting: blocks of general text mixed into `lm`'s training rows (`dataset.replay`).

What the fraction f means, exactly: of the first j rows a run trains on (counted over the whole
run, across micro-batches and optimizer steps), floor(j * f) are replay blocks, with f read as the
decimal it is written as (0.1 is 1/10, not the nearest binary float). Row j is a replay row when
floor((j + 1) * f) > floor(j * f), so an optimizer step s (from 0) of N rows holds
floor((s + 1) * N * f) - floor(s * N * f) of them: N * f when that is whole (N = 8 and f = 0.25:
2 a step), else one of the two nearest whole numbers in a fixed pattern.

Which rows are replay depends on the row's number only, not on how a step is split into
micro-batches: the step's rows, and so its update, are the same under any split (and when out of
memory halves the micro-batch), and a resume at row j continues exactly. The dataset's blocks
keep the order they have without replay (the same seeded ExampleStream, its rows shifted by the
replay rows between them); replay blocks come in a seeded order of their own. f = 0 is the
training without replay, batch for batch.

The general text is `python_docs_prose("train")` by default: Python-documentation topics
disjoint from `python_docs_prose("heldout")`, which the forgetting probe scores (and which leaves
out the paragraphs that these topics repeat word for word).
`dataset.replay_source` may list files instead (.txt/.jsonl/.json/.csv/.parquet, the text in
`dataset.text_field`). Replay blocks are made as training blocks are: the documents tokenized,
joined by the objective's separator and cut into whole blocks of `block_size`.
"""

from fractions import Fraction

from omegaconf import OmegaConf

from transfer.config.data import TxtSampleBy
from transfer.data.blocks import text_blocks
from transfer.data.sequences import ExampleStream, Sequences
from transfer.data.sources import python_docs_prose, read_files

# the replay order is seeded by the run's seed, apart from the training order's
SEED_OFFSET = 7919


def exact(fraction: float) -> Fraction:
    """The fraction as written: Fraction(0.1) would be 3602879701896397/36028797018963968."""
    return Fraction(repr(float(fraction)))


def replayed(rows: int, fraction: Fraction) -> int:
    """How many of the first `rows` training rows are replay rows: floor(rows * fraction), in integers."""
    return rows * fraction.numerator // fraction.denominator


def source_name(dataset_cfg) -> str:
    source = dataset_cfg.replay_source
    return "python_docs:train" if source == "python_docs" else ",".join(source)


def replay_texts(dataset_cfg) -> list[str]:
    """The documents replay draws its blocks from."""
    if dataset_cfg.replay_source == "python_docs":
        return python_docs_prose("train")  # the probe's part leaves out every paragraph this one holds
    field = dataset_cfg.text_field
    # files are read as dataset=text_files reads them; a .txt file one paragraph a document
    how = OmegaConf.create({"text_field": field, "txt_sample_by": TxtSampleBy.paragraph})
    rows = read_files(how, list(dataset_cfg.replay_source), "dataset.replay_source")
    return [r[field] for r in rows if isinstance(r.get(field), str)]


def replay_blocks(dataset_cfg, tokenizer, block_size: int, separator: int | None) -> Sequences:
    return text_blocks(replay_texts(dataset_cfg), tokenizer, block_size, separator, keep_partial=False,
                       where=f"dataset.replay_source={source_name(dataset_cfg)}")  # fmt: skip


def summary(dataset_cfg, blocks: Sequences | None) -> dict:
    """What the record's data.replay says: the fraction, where the text came from, the blocks it made."""
    if blocks is None:
        return {"fraction": dataset_cfg.replay, "source": None, "blocks": 0}
    return {"fraction": dataset_cfg.replay, "source": source_name(dataset_cfg), "blocks": len(blocks),
            "documents": blocks.documents, "tokens": blocks.tokens}  # fmt: skip


class ReplayStream:
    """Training rows as indices into `Pool(train, replay)`: the training stream's, with replay rows between.

    `position` is the number of rows drawn, replay rows included: what a checkpoint saves and a
    resume or a retried step sets back, each of the two streams then at its own place.
    """

    def __init__(self, train: ExampleStream, replay: ExampleStream, fraction: Fraction, offset: int, start: int = 0):
        self.train, self.replay, self.fraction, self.offset = train, replay, fraction, offset
        self.position = start

    @property
    def position(self) -> int:
        return self._position

    @position.setter
    def position(self, row: int) -> None:
        self._position = row
        self.replay.position = replayed(row, self.fraction)
        self.train.position = row - self.replay.position

    def is_replay(self, row: int) -> bool:
        return replayed(row + 1, self.fraction) > replayed(row, self.fraction)

    def next(self) -> int:
        index = self.offset + self.replay.next() if self.is_replay(self._position) else self.train.next()
        self._position += 1
        return index


class Pool:
    """The training blocks, then the replay blocks, numbered as one: what a mixed batch is padded from."""

    def __init__(self, train: Sequences, replay: Sequences):
        self.train, self.replay = train, replay

    def get(self, i: int):
        n = len(self.train)
        return self.train.get(i) if i < n else self.replay.get(i - n)

"""Token sequences, the order training draws them in, and the batches they make.

Every token objective (`lm`, `sft`) turns a split into `Sequences`: token ids, and labels
that say which tokens are scored (IGNORE elsewhere: a prompt, padding). Training draws them
in a seeded order that restarts from any position (`ExampleStream`: exact resume, and later
sharding by rank) and groups them into micro-batches, padded or packed. Each batch carries
its normaliser, the number of targets it scores, so that the loop can divide by the whole
optimizer step's count: the update is then the same under any split into micro-batches.
"""

import math
from dataclasses import dataclass, field

import torch

IGNORE = -100  # label of positions that are not scored


@dataclass
class Sequences:
    ids: torch.Tensor  # every sequence's tokens, one after another
    labels: torch.Tensor  # at the same positions: the token where it is scored, IGNORE where it is not
    starts: torch.Tensor  # sequence i is ids[starts[i]:starts[i + 1]]
    documents: int = 0  # the source documents (lm) or examples (sft) the sequences come from
    meta: list = field(default_factory=list, repr=False)  # per sequence, what evaluators need (sft: the conversation)
    info: dict = field(default_factory=dict)  # what the record says about how the split was made

    @classmethod
    def from_lists(cls, ids: list[list[int]], labels: list[list[int]], **kwargs) -> "Sequences":
        lengths = torch.tensor([0, *map(len, ids)], dtype=torch.long)
        flat = [t for seq in ids for t in seq]
        flat_labels = [t for seq in labels for t in seq]
        return cls(torch.tensor(flat, dtype=torch.long), torch.tensor(flat_labels, dtype=torch.long),
                   lengths.cumsum(0), **kwargs)  # fmt: skip

    def __len__(self) -> int:
        return len(self.starts) - 1

    def lengths(self) -> torch.Tensor:
        return self.starts.diff()

    def get(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        part = slice(int(self.starts[i]), int(self.starts[i + 1]))
        return self.ids[part], self.labels[part]

    @property
    def tokens(self) -> int:
        return len(self.ids)

    def scored(self) -> int:
        """Targets scored: a sequence's first token is predicted from nothing and never counts."""
        mask = self.labels != IGNORE
        mask[self.starts[:-1]] = False
        return int(mask.sum())

    def summary(self) -> dict:
        return {"documents": self.documents, "sequences": len(self), "tokens": self.tokens,
                "scored_tokens": self.scored(), **self.info}  # fmt: skip

    def content(self) -> tuple:
        """What a score of the split depends on: the tokens and which of them are scored (the sweep cache's key)."""
        return self.ids, self.labels, self.starts


def percentile(values: list[int], q: float) -> int:
    """The nearest-rank percentile: a length some sequence has."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


@dataclass
class Batch:
    input_ids: torch.Tensor  # [rows, length]
    labels: torch.Tensor  # `input_ids` itself when every target is scored (the loss then counts without a look)
    position_ids: torch.Tensor | None  # packed rows: positions restart with each example
    normaliser: int  # targets scored
    tokens: int  # real tokens, padding left out
    examples: int

    @property
    def positions(self) -> int:
        return self.input_ids.numel()

    def to(self, device) -> "Batch":
        ids = self.input_ids.to(device, non_blocking=True)
        labels = ids if self.labels is self.input_ids else self.labels.to(device, non_blocking=True)
        positions = None if self.position_ids is None else self.position_ids.to(device, non_blocking=True)
        return Batch(ids, labels, positions, self.normaliser, self.tokens, self.examples)


class ExampleStream:
    """Example indices, a fresh seeded order each epoch, end to end, from any position.

    `group` > 0 sorts each run of `group` examples of the epoch's order by length, longest
    first, so that a padded micro-batch holds examples of like length (less padding).
    """

    def __init__(self, lengths: torch.Tensor, seed: int, start: int = 0, group: int = 0):
        self.lengths, self.seed, self.group = lengths, seed, group
        self.position = start
        self._epoch, self._order = None, None

    def _order_of(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        order = torch.randperm(len(self.lengths), generator=g)
        if self.group:
            runs = order.split(self.group)
            order = torch.cat([run[torch.argsort(self.lengths[run], descending=True, stable=True)] for run in runs])
        return order.tolist()

    def _index(self, position: int) -> int:
        epoch, offset = divmod(position, len(self.lengths))
        if epoch != self._epoch:
            self._epoch, self._order = epoch, self._order_of(epoch)
        return self._order[offset]

    def peek(self) -> int:
        return self._index(self.position)

    def next(self) -> int:
        index = self._index(self.position)
        self.position += 1
        return index


def padded_batch(seqs: Sequences, indices: list[int], pad_id: int) -> Batch:
    """Sequences padded on the right to the longest: causal attention never looks right, so no mask is needed."""
    items = [seqs.get(i) for i in indices]
    length = max(len(ids) for ids, _ in items)
    ids = torch.full((len(items), length), pad_id, dtype=torch.long)
    labels = torch.full((len(items), length), IGNORE, dtype=torch.long)
    for row, (seq_ids, seq_labels) in enumerate(items):
        ids[row, : len(seq_ids)] = seq_ids
        labels[row, : len(seq_labels)] = seq_labels
    real = sum(len(i) for i, _ in items)
    if real == ids.numel() and torch.equal(labels, ids):
        labels = ids  # every target scored: the loss counts them without looking
    scored = int((labels[:, 1:] != IGNORE).sum())
    return Batch(ids, labels, None, scored, real, len(items))


def packed_batch(seqs: Sequences, stream: ExampleStream, rows: int, row_length: int, pad_id: int) -> Batch:
    """Whole examples from the stream laid end to end in `rows` rows of `row_length` tokens.

    Positions restart with each example, which transformers turns into attention that never
    crosses from one example to the next; each example's first token is no target of the one
    before it. The example that does not fit stays in the stream for the next row.
    """
    ids = torch.full((rows, row_length), pad_id, dtype=torch.long)
    labels = torch.full((rows, row_length), IGNORE, dtype=torch.long)
    positions = torch.zeros((rows, row_length), dtype=torch.long)
    real = examples = 0
    for row in range(rows):
        filled = 0
        while True:
            seq_ids, seq_labels = seqs.get(stream.peek())
            if filled + len(seq_ids) > row_length and filled:
                break
            stream.next()
            part = slice(filled, filled + len(seq_ids))
            ids[row, part], labels[row, part] = seq_ids, seq_labels
            labels[row, filled] = IGNORE
            positions[row, part] = torch.arange(len(seq_ids))
            filled += len(seq_ids)
            examples += 1
        real += filled
        positions[row, filled:] = torch.arange(row_length - filled)  # the padding is a sequence of its own
    scored = int((labels[:, 1:] != IGNORE).sum())
    return Batch(ids, labels, positions, scored, real, examples)


def evaluation_batches(seqs: Sequences, batch_size: int, pad_id: int):
    """Every sequence once, in order, padded in batches of `batch_size`: what an evaluation scores."""
    for start in range(0, len(seqs), batch_size):
        yield padded_batch(seqs, list(range(start, min(start + batch_size, len(seqs)))), pad_id)

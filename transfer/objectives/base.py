"""What every objective provides (the `Objective` and `Batch` protocols), and the token objective that `lm` and
`sft` share.

An objective turns a dataset into splits of examples, draws training batches from them,
gives the loss of a batch as (sum, normaliser, metrics), and judges a split with its
evaluators. The training loop (train.py) divides each step's sums by the normalisers summed
over the whole optimizer step, so the update is exact under masking and any split into
micro-batches; it keeps the weights that are best on `select`, the validation metric the
objective's config names, in the direction DIRECTION gives it.

`Objective` lists every member that the loop, run.py, the training modules and evaluation use;
`BaseObjective` gives the defaults most objectives keep. A new objective is a module here, its
row in config/objective.py OBJECTIVES (which names its class) and its YAML in conf/objective/.

`TokenObjective` is next-token prediction on the scored tokens of `Sequences`: `lm` scores
every token of fixed blocks of text, `sft` the answers of conversations. They differ in how
a split is made (`prepare`), what a sample is prompted with, and the evaluators added to
perplexity (`sft`: choice scoring when the dataset names its choices).
"""

import math
from typing import Protocol

from transfer.config.objective import DIRECTION
from transfer.data.sequences import ExampleStream, Sequences, packed_batch, padded_batch
from transfer.evaluation.perplexity import perplexity
from transfer.training.loss import LossOptions, summed_lm_loss


class Batch(Protocol):
    """A micro-batch as the loop sees it; its contents are its objective's business."""

    @property
    def normaliser(self) -> int: ...  # what its loss sum counts (tokens, pairs); a step's sums are divided by theirs

    @property
    def tokens(self) -> int: ...  # real tokens, padding left out (the record's tokens and speed)

    @property
    def positions(self) -> int: ...  # positions computed, padding in (the record's padding share)

    def to(self, device) -> "Batch": ...  # its tensors on the device


class Split(Protocol):
    """A prepared split: the record summarises it, the sweep cache keys it, the cache's model hash reads a row."""

    def __len__(self) -> int: ...  # sequences
    def get(self, i: int) -> tuple: ...  # sequence i's (input_ids, labels)
    def summary(self) -> dict: ...  # the record's data.<split>
    def content(self) -> tuple: ...  # what a score of it depends on


class Objective(Protocol):
    """Every member the loop (train.py), the run (run.py), the training modules and evaluation ask of an objective."""

    name: str  # objective.name: the record's, and the checks'
    pad_id: int  # what batches are padded with (probes and diagnostics pad with it too)
    metrics: tuple[str, ...]  # what evaluate() returns of a split; `select` is one of them

    @property
    def select(self) -> str: ...  # the validation metric that picks the best weights
    @property
    def mode(self) -> str: ...  # "min" or "max": the way `select` improves
    def better(self, value: float, best: float, min_delta: float) -> bool: ...  # value improves on best by min_delta
    def worst(self) -> float: ...  # what every value of `select` improves on

    def prepare(self, max_eval_tokens: int | None) -> dict[str, Split]: ...  # train, validation and test splits
    def data_summary(self) -> dict: ...  # the record's `data` besides the splits
    def data_warnings(self) -> list[str]: ...  # what about the data makes a result mean less than it seems
    def attach(self, model, splits: dict, run_cfg, hardware) -> dict: ...  # set up on the initial model; recorded
    def to(self, device, dtype=None) -> None: ...  # what it keeps on the device (a reference model) follows the model

    def units(self, split) -> int: ...  # training units (examples, pairs) of a split: what an epoch passes over
    def epochs(self, drawn: int, split) -> float: ...  # passes over the split that `drawn` rows make
    def steps_per_epoch(self, split, per_step: int) -> float: ...  # optimizer steps of one pass
    def stream(self, split, seed: int, start: int, per_step: int) -> ExampleStream: ...  # the seeded order of rows
    def batch(self, split, stream: ExampleStream, micro_batch_size: int) -> Batch: ...  # the next micro-batch
    def begin_step(self, model, batches: list, hardware) -> None: ...  # a step's batches, before their losses
    def loss(self, model, batch, options: LossOptions) -> tuple: ...  # (sum, normaliser, metrics) of a batch

    def evaluate(self, model, split, batch_size: int, hardware, desc: str) -> dict: ...  # `metrics` of a split
    def sample_inputs(self, splits: dict, prompts: list[str]) -> tuple[list[dict], str]: ...  # what samples continue
    def describe(self) -> dict: ...  # the record's `objective`
    def baseline_key(self) -> dict: ...  # what the untrained model's scores depend on of it (the sweep cache's key)


class BaseObjective:
    """The defaults most objectives keep; see TokenObjective and preference.py for two kinds."""

    name = "objective"

    def __init__(self, cfg, dataset_cfg, tokenizer, block_size: int):
        self.cfg, self.dataset_cfg, self.tokenizer, self.block_size = cfg, dataset_cfg, tokenizer, block_size
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id or 0

    # ---------------------------------------------------------------- what picks the best weights
    @property
    def select(self) -> str:
        return self.cfg.select

    @property
    def mode(self) -> str:
        return DIRECTION[self.select]

    def better(self, value: float, best: float, min_delta: float) -> bool:
        return value < best - min_delta if self.mode == "min" else value > best + min_delta

    def worst(self) -> float:
        return math.inf if self.mode == "min" else -math.inf

    # ---------------------------------------------------------------- data and the model
    def units(self, split) -> int:
        return len(split)

    def epochs(self, drawn: int, split) -> float:
        """lm's replay rows are not of the training split: it counts only its own."""
        return drawn / self.units(split)

    def data_summary(self) -> dict:
        return {}

    def data_warnings(self) -> list[str]:
        return []

    def attach(self, model, splits: dict, run_cfg, hardware) -> dict:
        return {}

    def to(self, device, dtype=None) -> None:
        """Floating-point tensors only are cast to `dtype`, when one is given."""

    def begin_step(self, model, batches: list, hardware) -> None:
        """For statistics over the whole step (KTO's KL estimate)."""

    def describe(self) -> dict:
        return {"name": self.name, "select": self.select, "mode": self.mode}

    def baseline_key(self) -> dict:
        return self.describe()


class TokenObjective(BaseObjective):
    name = "token"
    # the metrics evaluate() returns for a split; `select` must be one of them
    metrics = ("loss", "perplexity")

    def __init__(self, cfg, dataset_cfg, tokenizer, block_size: int):
        super().__init__(cfg, dataset_cfg, tokenizer, block_size)
        self.packed = cfg.get("batching") is not None and cfg.batching.value == "packed"

    def prepare(self, max_eval_tokens: int | None) -> dict[str, Sequences]:
        raise NotImplementedError

    def stream(self, train: Sequences, seed: int, start: int, per_step: int) -> ExampleStream:
        """Training examples in a seeded order from `start`; padded batches group examples of like length.

        The runs sorted by length are 50 optimizer steps' worth of examples (`per_step` each): the
        order, and so each step's examples, do not depend on how a step is split into micro-batches.
        """
        equal = bool((train.lengths() == train.lengths()[0]).all())
        group = 0 if self.packed or equal else 50 * per_step
        return ExampleStream(train.lengths(), seed, start, group)

    def batch(self, train: Sequences, stream: ExampleStream, micro_batch_size: int):
        if self.packed:
            return packed_batch(train, stream, micro_batch_size, self.block_size, self.pad_id)
        return padded_batch(train, [stream.next() for _ in range(micro_batch_size)], self.pad_id)

    def steps_per_epoch(self, train: Sequences, per_step: int) -> float:
        """Optimizer steps for one pass over the training examples (packed: estimated from their tokens)."""
        if self.packed:
            return train.tokens / (per_step * self.block_size)
        return len(train) / per_step

    # ---------------------------------------------------------------- loss and evaluation
    def loss(self, model, batch, options: LossOptions):
        total, count = summed_lm_loss(model, batch.input_ids, batch.labels, options.chunk_tokens, batch.position_ids,
                                      liger=options.liger)  # fmt: skip
        return total, count, {}

    def evaluate(self, model, split: Sequences, batch_size: int, hardware, desc: str) -> dict:
        return perplexity(model, split, batch_size, hardware, self.pad_id, desc)

    def sample_inputs(self, splits: dict[str, Sequences], prompts: list[str]) -> tuple[list[dict], str]:
        """What the samples before and after training continue ({prompt, input_ids, ...}), and where they are from."""
        raise NotImplementedError

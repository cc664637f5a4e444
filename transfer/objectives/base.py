"""What every objective provides, and the token objective that `lm` and `sft` share.

An objective turns a dataset into splits of examples, draws training batches from them,
gives the loss of a batch as (sum, normaliser, metrics), and judges a split with its
evaluators. The training loop (train.py) divides each step's sums by the normalisers summed
over the whole optimizer step, so the update is exact under masking and any split into
micro-batches; it keeps the weights that are best on `select`, the validation metric the
objective's config names, in the direction evaluation.DIRECTION gives it.

`TokenObjective` is next-token prediction on the scored tokens of `Sequences`: `lm` scores
every token of fixed blocks of text, `sft` the answers of conversations. They differ in how
a split is made (`prepare`), what a sample is prompted with, and the evaluators added to
perplexity (`sft`: choice scoring when the dataset names its choices).
"""

import math

from transfer.data.sequences import ExampleStream, Sequences, packed_batch, padded_batch
from transfer.evaluation import DIRECTION
from transfer.evaluation.perplexity import perplexity
from transfer.training.loss import summed_lm_loss


class Objective:
    """What the loop and the run ask of every objective; see TokenObjective and preference.py for two kinds."""

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
    def prepare(self, max_eval_tokens: int | None) -> dict:
        """Train, validation and test splits."""
        raise NotImplementedError

    def units(self, split) -> int:
        """How many training units (examples, pairs) a split holds: what an epoch passes over."""
        return len(split)

    def epochs(self, drawn: int, split) -> float:
        """Passes over the training split that `drawn` rows of training make (lm's replay rows are not of it)."""
        return drawn / self.units(split)

    def data_summary(self) -> dict:
        """What the record's `data` says besides the splits (lm: its replay)."""
        return {}

    def data_warnings(self) -> list[str]:
        """What about the prepared data makes a result mean less than it seems (sft: choices written otherwise)."""
        return []

    def attach(self, model, splits: dict, run_cfg, hardware) -> dict:
        """Anything the objective needs of the model before the baseline (a reference model); what the record says."""
        return {}

    def to(self, device, dtype=None) -> None:
        """Move what the objective keeps on the device (a reference model) along with the model, cast to `dtype`
        (floating-point tensors only) when one is given."""

    def begin_step(self, model, batches: list, hardware) -> None:
        """Called with an optimizer step's batches before their losses: for statistics over the whole step."""

    def describe(self) -> dict:
        """What the record says about the objective."""
        return {"name": self.name, "select": self.select, "mode": self.mode}

    def baseline_key(self) -> dict:
        """What the untrained model's scores depend on of the objective as built (the sweep cache's key)."""
        return self.describe()


class TokenObjective(Objective):
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
    def loss(self, model, batch, chunk_tokens: int):
        total, count = summed_lm_loss(model, batch.input_ids, batch.labels, chunk_tokens, batch.position_ids)
        return total, count, {}

    def evaluate(self, model, split: Sequences, batch_size: int, hardware, desc: str) -> dict:
        return perplexity(model, split, batch_size, hardware, self.pad_id, desc)

    def sample_inputs(self, splits: dict[str, Sequences], prompts: list[str]) -> list[dict]:
        """What the samples before and after training continue: {prompt, input_ids, ...}."""
        raise NotImplementedError

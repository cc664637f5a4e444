"""`lm`: next-token prediction on every token of fixed blocks of concatenated text (the default)."""

from transfer.data import replay
from transfer.data.blocks import separator_id, text_blocks
from transfer.data.sequences import ExampleStream, padded_batch
from transfer.data.sources import SPLITS, load_texts
from transfer.objectives.base import TokenObjective


def opening_words(texts: list[str], n: int = 3, words: int = 6) -> list[str]:
    """Prompts for samples when none are configured: the first words of the first documents long enough to go on."""
    long_enough = [t.split() for t in texts if len(t.split()) >= 2 * words]
    return [" ".join(w[:words]) for w in (long_enough or [t.split() for t in texts if t.split()])[:n]]


class LanguageModelling(TokenObjective):
    name = "lm"
    fraction = replay.exact(0.0)  # dataset.replay, exactly
    replay_split = None  # the replay blocks, when the fraction is not 0

    def prepare(self, max_eval_tokens):
        texts = load_texts(self.dataset_cfg)
        self.separator, separator = separator_id(self.tokenizer, self.cfg.separator)
        splits = {}
        for name in SPLITS:
            where = f"dataset {self.dataset_cfg.name!r}: the {name} split (field {self.dataset_cfg.text_field!r})"
            cap = None if name == "train" else max_eval_tokens  # training text is never cut
            splits[name] = text_blocks(texts[name], self.tokenizer, self.block_size, separator,
                                       keep_partial=name != "train", max_tokens=cap, where=where)  # fmt: skip
        self.openings = opening_words(texts["validation"])
        self.fraction = replay.exact(self.dataset_cfg.replay)
        if self.fraction:
            self.replay_split = replay.replay_blocks(self.dataset_cfg, self.tokenizer, self.block_size, separator)
        return splits

    # ---------------------------------------------------------------- replay (transfer/data/replay.py)
    def stream(self, train, seed, start, per_step):
        if self.replay_split is None:
            return super().stream(train, seed, start, per_step)
        own = ExampleStream(self.replay_split.lengths(), seed + replay.SEED_OFFSET)
        return replay.ReplayStream(super().stream(train, seed, 0, per_step), own, self.fraction, len(train), start)

    def batch(self, train, stream, micro_batch_size):
        if self.replay_split is None:
            return super().batch(train, stream, micro_batch_size)
        rows = [stream.next() for _ in range(micro_batch_size)]
        return padded_batch(replay.Pool(train, self.replay_split), rows, self.pad_id)

    def steps_per_epoch(self, train, per_step):
        # a step holds (1 - f) of its rows from the training split, on average
        return super().steps_per_epoch(train, per_step) / (1 - float(self.fraction))

    def epochs(self, drawn, split):
        return super().epochs(drawn - replay.replayed(drawn, self.fraction), split)

    def data_summary(self):
        return {"replay": replay.summary(self.dataset_cfg, self.replay_split)}

    def sample_inputs(self, splits, prompts):
        source = "dataset.prompts" if prompts else "the opening words of validation documents"
        inputs = [{"prompt": p, "input_ids": self.tokenizer(p)["input_ids"]} for p in prompts or self.openings]
        return inputs, source

    def describe(self):
        return {**super().describe(), "separator": self.separator}

"""`lm`: next-token prediction on every token of fixed blocks of concatenated text (the default)."""

from transfer.data.blocks import separator_id, text_blocks
from transfer.data.sources import SPLITS, load_texts
from transfer.objectives.base import TokenObjective


def opening_words(texts: list[str], n: int = 3, words: int = 6) -> list[str]:
    """Prompts for samples when none are configured: the first words of the first documents long enough to go on."""
    long_enough = [t.split() for t in texts if len(t.split()) >= 2 * words]
    return [" ".join(w[:words]) for w in (long_enough or [t.split() for t in texts if t.split()])[:n]]


class LanguageModelling(TokenObjective):
    name = "lm"

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
        return splits

    def sample_inputs(self, splits, prompts):
        source = "dataset.prompts" if prompts else "the opening words of validation documents"
        inputs = [{"prompt": p, "input_ids": self.tokenizer(p)["input_ids"]} for p in prompts or self.openings]
        return inputs, source

    def describe(self):
        return {**super().describe(), "separator": self.separator}

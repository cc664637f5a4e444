"""`sft`: instruction fine-tuning. The loss counts the assistant's answers, framed by the chat template.

Rows become conversations (data/chat.py: formats, templates, masking, truncation); a dataset
that names its `choices` is also judged by scoring each choice after the prompt (accuracy,
log-loss, ROC-AUC: evaluation/choices.py), which `objective.select` may pick the best weights by.
"""

from collections import Counter

import torch

from transfer.config.objective import choice_metric_names, spec
from transfer.data.chat import (
    Example,
    answer_tokens,
    detect_format,
    fit,
    fitted_examples,
    generation_prompt,
    template_of,
    to_example,
)
from transfer.data.sequences import Sequences
from transfer.data.sources import SPLITS, load_rows, origin
from transfer.errors import TransferError
from transfer.evaluation.choices import choice_metrics, choice_scores
from transfer.evaluation.perplexity import perplexity
from transfer.objectives.base import TokenObjective


class InstructionTuning(TokenObjective):
    name = "sft"

    def __init__(self, cfg, dataset_cfg, tokenizer, block_size):
        super().__init__(cfg, dataset_cfg, tokenizer, block_size)
        self.template = template_of(tokenizer, cfg.template.value)
        self.choices = list(dataset_cfg.choices) if dataset_cfg.choices else None
        self.metrics = ("loss", "perplexity", *choice_metric_names(self.choices))
        self._choice_seqs: dict[int, tuple[Sequences, torch.Tensor]] = {}
        self._forms: list[Counter] = [Counter() for _ in self.choices or ()]  # how the data writes each choice
        self.scored_choices = self.choices  # as the data writes them, once prepare() has read it
        self.notes: list[str] = []  # where they differ
        self.whole_lengths: dict[str, list[int]] = {}  # each split's examples' lengths before block_size cut them

    def prepare(self, max_eval_tokens):
        rows = load_rows(self.dataset_cfg, spec(self.name).fields(self.dataset_cfg))
        name = self.dataset_cfg.name
        self.format = detect_format(rows["train"][0], self.dataset_cfg, f"dataset {name!r}") if rows["train"] else None
        splits = {split: self._examples(rows[split], split, None if split == "train" else max_eval_tokens)
                  for split in SPLITS}  # fmt: skip
        self.scored_choices = self._choices_as_written()
        return splits

    def _choices_as_written(self) -> list[str] | None:
        """The choices as the data's answers write them, which is what training scored: `dataset.choices=[Yes, No]`
        on completions written " Yes" scores " Yes" (another token than "Yes"). Said in a warning where they differ."""
        if not self.choices:
            return None
        scored, self.notes = [], []
        for choice, forms in zip(self.choices, self._forms, strict=True):
            written = forms.most_common(1)[0][0] if forms else choice
            if written != choice or len(forms) > 1:
                ways = ", ".join(f"{form!r} {n:,} times" for form, n in forms.most_common())
                self.notes.append(f"dataset.choices {choice!r} is written {ways} in the data's answers; choices are "
                                  f"scored as training saw them most: {written!r}")  # fmt: skip
            scored.append(written)
        return scored

    def data_warnings(self) -> list[str]:
        return list(self.notes)

    def _examples(self, rows: list[dict], split: str, max_tokens: int | None) -> Sequences:
        def items():  # lazily: a row past max_tokens is not read, nor its gold checked
            for number, row in enumerate(rows, start=1):
                where = origin(row, f"dataset {self.dataset_cfg.name!r} {split} row {number}")  # its file and line
                example = to_example(row, self.format, self.dataset_cfg, where)
                yield example, {"example": example, "gold": self._gold(row, example, where)}

        self.whole_lengths[split] = []
        ids_list, labels_list, meta, counts = fitted_examples(
            items(), self.tokenizer, self.template, self.cfg.train_on_prompt, self.block_size,
            self.cfg.truncation.value == "drop", max_tokens, self.whole_lengths[split],
        )  # fmt: skip
        if not ids_list:
            raise TransferError(
                f"dataset {self.dataset_cfg.name!r}: no {split} example is left of {len(rows)} "
                f"({', '.join(f'{k} {v}' for k, v in counts.items() if v) or 'the split is empty'}); "
                f"allowed: a larger block_size, objective.truncation=truncate, or examples with answers"
            )
        info = {"examples": len(rows), **counts, "format": self.format, "template": self.template}
        return Sequences.from_lists(ids_list, labels_list, documents=len(rows), meta=meta, info=info)

    def _gold(self, row: dict, example, where: str) -> int | None:
        if not self.choices:
            return None
        field = self.dataset_cfg.label_field
        answer = row.get(field) if field else example.answer
        stripped = [c.strip() for c in self.choices]
        if not isinstance(answer, str) or answer.strip() not in stripped:
            raise TransferError(f"{where}: the answer {answer!r} is not one of dataset.choices {self.choices}")
        gold = stripped.index(answer.strip())
        if example.answer.strip() == stripped[gold]:  # the answer trained is the choice (not a label field's word)
            self._forms[gold][example.answer] += 1
        return gold

    def evaluate(self, model, split, batch_size, hardware, desc):
        result = perplexity(model, split, batch_size, hardware, self.pad_id, desc)
        if self.choices:
            seqs, gold = self._choice_sequences(split)
            scores = choice_scores(model, seqs, len(self.choices), batch_size, hardware, self.pad_id, f"{desc} choices")
            result.update(choice_metrics(scores, gold, [str(c).strip() for c in self.choices]))  # as named, unspaced
        return result

    def _choice_sequences(self, split: Sequences) -> tuple[Sequences, torch.Tensor]:
        """Every example answered with every choice, labelled on the choice: made once per split."""
        if id(split) not in self._choice_seqs:
            ids_list, labels_list = [], []
            for item in split.meta:
                for choice in self.scored_choices:
                    ids, labels = answer_tokens(item["example"], choice, self.tokenizer, self.template)
                    ids, labels, _ = fit(ids, labels, self.block_size)
                    ids_list.append(ids)
                    labels_list.append(labels)
            gold = torch.tensor([item["gold"] for item in split.meta])
            self._choice_seqs[id(split)] = (Sequences.from_lists(ids_list, labels_list), gold)
        return self._choice_seqs[id(split)]

    def sample_inputs(self, splits, prompts):
        """The first validation examples' prompts through the template (or dataset.prompts as questions)."""
        if prompts:
            examples = [Example([{"role": "user", "content": p}, {"role": "assistant", "content": ""}], raw=(p, ""))
                        for p in prompts]  # fmt: skip
            source = "dataset.prompts"
        else:
            examples = [item["example"] for item in splits["validation"].meta[: self.cfg.samples]]
            source = "the first validation examples"
        inputs = []
        for example in examples:
            text = generation_prompt(example, self.tokenizer, self.template)
            ids = self.tokenizer(text, add_special_tokens=self.template != "chat")["input_ids"]
            user = next((m["content"] for m in reversed(example.messages) if m["role"] == "user"), "")
            inputs.append({"prompt": user, "reference": example.answer, "input_ids": ids})
        return inputs, source

    def describe(self):
        return {**super().describe(), "template": self.template, "train_on_prompt": self.cfg.train_on_prompt,
                "truncation": self.cfg.truncation.value, "batching": self.cfg.batching.value,
                "choices": self.choices, "choices_scored": self.scored_choices}  # fmt: skip

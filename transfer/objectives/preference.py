"""Preference optimisation: DPO, IPO, KTO, CPO, ORPO and SimPO, as rows of one loss table (preference_losses.py).

Every row reads the same scores of each answer: the policy's summed log-probability of its
tokens (through the chunked head: the logits of a 151,936-token vocabulary never exist for a
whole batch), the reference's where the method has one, and the answer's length. A pair's
chosen and rejected answers go through the model in one forward pass (concatenated rows).

The reference (reference.py): none for cpo, orpo, simpo; for the others the base model with
its adapters disabled, a frozen copy of the initial model, or its log-probabilities precomputed.

KTO trains on unpaired answers; pairs are unpaired for it (the chosen answer desirable, the
rejected one not). Its KL estimate z is the mean log-ratio of each prompt with another
example's answer, clamped at 0 and taken over the whole optimizer step (evaluation: the whole
split), so that it does not depend on how a step is split into micro-batches.
"""

import logging
from dataclasses import dataclass, field

import torch

from transfer.config.objective import spec
from transfer.data.chat import (
    Example,
    fit,
    fitted_tokens,
    generation_prompt,
    template_of,
    to_pair,
    to_unpaired,
    training_tokens,
)
from transfer.data.sequences import IGNORE, ExampleStream, Sequences, padded_batch
from transfer.data.sequences import Batch as Rows
from transfer.data.sources import SPLITS, load_rows, origin
from transfer.errors import TransferError
from transfer.evaluation import my_shown_batches
from transfer.objectives.base import BaseObjective
from transfer.objectives.preference_losses import PAIR_LOSSES, Scores, kto
from transfer.objectives.reference import Reference
from transfer.training import distributed
from transfer.training.loss import LossOptions, logprobs_and_kl, scored_head_inputs, sequence_logprobs

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- data
@dataclass
class PreferenceSplit:
    """Every answer framed by its prompt and labelled on the answer; how they pair up; what they are."""

    seqs: Sequences
    pairs: torch.Tensor | None  # [pairs, 2]: the chosen and the rejected answer's sequence; None for unpaired rows
    desirable: torch.Tensor  # per sequence
    examples: list[Example]  # per sequence: for KTO's mismatched answers and the samples
    info: dict = field(default_factory=dict)
    reference: torch.Tensor | None = None  # per sequence, when precomputed

    def units(self, kto_units: bool) -> int:
        return len(self.seqs) if kto_units or self.pairs is None else len(self.pairs)

    def __len__(self) -> int:
        return len(self.seqs)

    def get(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.seqs.get(i)

    def content(self) -> tuple:
        """What a score of the split depends on: the answers' tokens, how they pair up, which are desirable, and the
        reference's log-probabilities where they were precomputed (the sweep cache's key)."""
        pairs = "unpaired" if self.pairs is None else self.pairs
        reference = "live" if self.reference is None else self.reference
        return (*self.seqs.content(), pairs, self.desirable, reference)

    def summary(self) -> dict:
        return {**self.seqs.summary(), "pairs": None if self.pairs is None else len(self.pairs), **self.info}


@dataclass
class PreferenceBatch:
    """A micro-batch of answers (objectives.base.Batch): its loss is summed over its units, pairs or KTO's answers."""

    split: PreferenceSplit = field(repr=False, compare=False)  # drawn from (KTO's begin_step reads its answers)
    rows: Rows  # the answers; for pairs the chosen ones first, then the rejected ones
    index: torch.Tensor  # which of the split's sequences the rows are
    normaliser: int  # pairs, or KTO's answers
    desirable: torch.Tensor  # per row
    reference: torch.Tensor | None = None  # per row, when precomputed
    kl: torch.Tensor | None = None  # KTO: the step's KL estimate (begin_step)

    @property
    def tokens(self) -> int:
        return self.rows.tokens

    @property
    def positions(self) -> int:
        return self.rows.positions

    def to(self, device) -> "PreferenceBatch":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return PreferenceBatch(self.split, self.rows.to(device), self.index, self.normaliser,
                               self.desirable.to(device), move(self.reference), move(self.kl))  # fmt: skip


class PreferenceOptimisation(BaseObjective):
    metrics = ("loss", "reward_accuracy", "margin")

    def __init__(self, cfg, dataset_cfg, tokenizer, block_size):
        super().__init__(cfg, dataset_cfg, tokenizer, block_size)
        self.name = cfg.name
        self.spec = spec(self.name)
        self.kto = self.spec.unpaired  # KTO's units are answers, labelled desirable or not, rather than pairs
        chosen = dataset_cfg.template if dataset_cfg.template is not None else cfg.template
        self.template = template_of(tokenizer, chosen.value)
        self.reference = Reference(self.name, cfg, self.pad_id, needed=self.spec.reference)

    # ---------------------------------------------------------------- data
    def prepare(self, max_eval_tokens):
        rows = load_rows(self.dataset_cfg, self.spec.fields(self.dataset_cfg))
        return {name: self._split(rows[name], name, None if name == "train" else max_eval_tokens) for name in SPLITS}

    def _split(self, rows: list[dict], split: str, max_tokens: int | None) -> PreferenceSplit:
        d = self.dataset_cfg
        ids_list, labels_list, examples, desirable, pairs = [], [], [], [], []
        counts = {"truncated_prompt": 0, "truncated_response": 0, "dropped_too_long": 0, "dropped_no_answer": 0,
                  "identical_in_file": 0, "identical_after_truncation": 0}  # fmt: skip
        paired, same = None, []
        for number, row in enumerate(rows, start=1):
            where = origin(row, f"dataset {d.name!r} {split} row {number}")  # its file and line
            is_pair = d.chosen_field in row and d.rejected_field in row
            if paired is not None and is_pair != paired:
                raise TransferError(f"{where}: pairs and unpaired rows are mixed; one kind a dataset")
            paired = is_pair
            if is_pair:
                answers = list(zip(to_pair(row, d, where), (True, False), strict=True))
                if answers[0][0] == answers[1][0]:  # written so: nothing to prefer, and not truncation's doing
                    counts["identical_in_file"] += 1
                    same.append(where)
                    continue
            elif self.kto:
                answers = [to_unpaired(row, d, where)]
            else:
                raise TransferError(
                    f"{where}: objective={self.name} needs pairs ({d.chosen_field}, {d.rejected_field})"
                )
            encoded = []
            for example, good in answers:
                tokens = fitted_tokens(example, self.tokenizer, self.template, False, self.block_size,
                                       self.cfg.truncation.value == "drop", counts)  # fmt: skip
                if tokens is None:
                    break
                encoded.append((*tokens, example, good))
            if len(encoded) != len(answers):
                continue
            if is_pair and encoded[0][0] == encoded[1][0]:
                counts["identical_after_truncation"] += 1  # nothing to prefer: left out
                continue
            if (
                max_tokens is not None
                and ids_list
                and sum(map(len, ids_list)) + sum(len(e[0]) for e in encoded) > max_tokens
            ):
                break
            start = len(ids_list)
            for ids, labels, example, good in encoded:
                ids_list.append(ids)
                labels_list.append(labels)
                examples.append(example)
                desirable.append(good)
            if is_pair:
                pairs.append((start, start + 1))
        if same:
            log.warning(
                "dataset %r %s: %d pairs left out, their chosen and rejected answers the same as written (%s%s)",
                d.name, split, len(same), same[0], ", ..." if len(same) > 1 else "",
            )  # fmt: skip
        if not ids_list:
            cut = counts["truncated_prompt"] + counts["truncated_response"] + counts["dropped_too_long"]
            raise TransferError(
                f"dataset {d.name!r}: no {split} example is left of {len(rows)} "
                f"({', '.join(f'{k} {v}' for k, v in counts.items() if v) or 'the split is empty'}"
                f"{f'; the first identical as written: {same[0]}' if same else ''}); allowed: "
                + ("a larger block_size, or objective.truncation=truncate" if cut else "pairs whose answers differ")
            )
        seqs = Sequences.from_lists(ids_list, labels_list, documents=len(rows))
        info = {"rows": len(rows), **counts, "template": self.template}
        return PreferenceSplit(seqs, torch.tensor(pairs) if paired else None, torch.tensor(desirable), examples, info)

    # ---------------------------------------------------------------- the reference (objectives/reference.py)
    def attach(self, model, splits, run_cfg, hardware) -> dict:
        """Set up the reference before the baseline, while the model is still the initial one."""
        seqs = {name: split.seqs for name, split in splits.items() if name in SPLITS}
        info = self.reference.attach(model, seqs, run_cfg, hardware, keep_live=self.kto)  # KTO's mismatched answers
        for name, logps in self.reference.precomputed.items():
            splits[name].reference = logps
        return info

    def to(self, device, dtype=None) -> None:
        self.reference.to(device, dtype)

    # ---------------------------------------------------------------- training
    def stream(self, split: PreferenceSplit, seed: int, start: int, per_step: int) -> ExampleStream:
        lengths = split.seqs.lengths()
        unit_lengths = lengths if self.kto or split.pairs is None else lengths[split.pairs].sum(1)
        return ExampleStream(unit_lengths, seed, start, group=50 * per_step)

    def units(self, split: PreferenceSplit) -> int:
        return split.units(self.kto)

    def steps_per_epoch(self, split: PreferenceSplit, per_step: int) -> float:
        return split.units(self.kto) / per_step

    def batch(self, split: PreferenceSplit, stream: ExampleStream, micro_batch_size: int) -> PreferenceBatch:
        return self._batch(split, [stream.next() for _ in range(micro_batch_size)])

    def _batch(self, split: PreferenceSplit, units: list[int]) -> PreferenceBatch:
        """KTO's units are answers; the others' are pairs, whose chosen rows come first, then the rejected."""
        index = torch.tensor(units) if self.kto else torch.cat([split.pairs[units, 0], split.pairs[units, 1]])
        rows = padded_batch(split.seqs, index.tolist(), self.pad_id)
        reference = None if split.reference is None else split.reference[index]
        return PreferenceBatch(split, rows, index, len(units), split.desirable[index], reference)

    def _mismatched(self, split: PreferenceSplit, prompts: list[int], answers: list[int]) -> Rows:
        ids_list, labels_list = [], []
        for p, a in zip(prompts, answers, strict=True):
            example = split.examples[p].with_answer(split.examples[a].answer)
            ids, labels = training_tokens(example, self.tokenizer, self.template, train_on_prompt=False)
            ids, labels, _ = fit(ids, labels, self.block_size)
            ids_list.append(ids)
            labels_list.append(labels)
        seqs = Sequences.from_lists(ids_list, labels_list)
        return padded_batch(seqs, list(range(len(seqs))), self.pad_id)

    def begin_step(self, model, batches, hardware) -> None:
        """KTO: the KL estimate over the whole step, each of its prompts with the step's next answer (so the
        estimate does not depend on the split into micro-batches); no gradient flows through it."""
        if not self.kto:
            return
        answers = torch.cat([b.index for b in batches]).tolist()
        kl = self._kl_estimate(model, batches[0].split, answers, len(batches[0].index), hardware)
        for batch in batches:
            batch.kl = kl

    @torch.no_grad()
    def _kl_estimate(
        self, model, split: PreferenceSplit, answers: list[int], batch_size: int, hardware
    ) -> torch.Tensor:
        """KTO's z: the mean log-ratio of policy to reference on each prompt answered with the next answer, at least 0."""
        partners = answers[1:] + answers[:1]
        ratios = []
        for start in range(0, len(answers), batch_size):
            part = slice(start, start + batch_size)
            rows = self._mismatched(split, answers[part], partners[part]).to(hardware.device)
            with hardware.autocast():
                policy = sequence_logprobs(model, rows.input_ids, rows.labels, hardware.loss_chunk_tokens)
                ratios.append(policy - self.reference.live(rows, hardware.loss_chunk_tokens))
        return torch.cat(ratios).mean().clamp(min=0)

    def loss(self, model, batch: PreferenceBatch, options: LossOptions):
        rows = batch.rows
        policy = sequence_logprobs(model, rows.input_ids, rows.labels, options.chunk_tokens)
        reference = self.reference.scores(rows, batch.reference, options.chunk_tokens)
        losses, _ = self._losses(policy, reference, rows.labels, batch)
        return losses.sum(), batch.normaliser, {}

    def _losses(self, policy, reference, labels, batch: PreferenceBatch):
        length = (labels[:, 1:] != IGNORE).sum(1).float()
        if self.kto:
            s = Scores(policy, reference, length)
            losses, rewards = kto(s, batch.desirable, batch.kl, self.cfg)
            return losses, {"rewards": rewards, "policy": policy, "reference": reference}
        n = batch.normaliser
        c = Scores(policy[:n], None if reference is None else reference[:n], length[:n])
        r = Scores(policy[n:], None if reference is None else reference[n:], length[n:])
        losses, chosen, rejected = PAIR_LOSSES[self.name](c, r, self.cfg)
        return losses, {"chosen": chosen, "rejected": rejected, "policy": policy, "reference": reference}

    # ---------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self, model, split: PreferenceSplit, batch_size: int, hardware, desc: str) -> dict:
        """The method's loss and token KL on a split, and of each answer its reward and log-probability:
        for pairs (KTO's too, when its data are pairs) how often the chosen answer wins, and by how much."""
        was_training = model.training
        model.eval()
        try:
            kl = self._kl_estimate(model, split, list(range(len(split))), batch_size, hardware) if self.kto else None
            sums, rewards, logps = self._scored(model, split, batch_size, hardware, kl, desc)
        finally:
            model.train(was_training)
        rewards, logps = distributed.summed(rewards, "cpu"), distributed.summed(logps, "cpu")
        keys = sorted(sums)  # the same on every process: each ran at least one batch
        added = distributed.summed_floats(*(part for key in keys for part in sums[key]))
        result = {key: added[2 * i] / added[2 * i + 1] for i, key in enumerate(keys)}
        if split.pairs is not None:
            chosen, rejected = rewards[split.pairs[:, 0]], rewards[split.pairs[:, 1]]
            result["reward_accuracy"] = float(
                ((chosen > rejected).double() + 0.5 * (chosen == rejected).double()).mean()
            )
            result["margin"] = float((chosen - rejected).mean())
            result["chosen_reward"], result["rejected_reward"] = float(chosen.mean()), float(rejected.mean())
            result["chosen_logp"] = float(logps[split.pairs[:, 0]].mean())
            result["rejected_logp"] = float(logps[split.pairs[:, 1]].mean())
        if self.kto:
            result["desirable_reward"] = float(rewards[split.desirable].mean()) if split.desirable.any() else None
            result["undesirable_reward"] = float(rewards[~split.desirable].mean()) if (~split.desirable).any() else None
            result["kto_kl"] = float(kl)  # the clamped mean log-ratio on mismatched answers, as KTO uses it
        result["examples"] = split.units(self.kto)
        return result

    def _scored(
        self, model, split: PreferenceSplit, batch_size: int, hardware, kl, desc: str
    ) -> tuple[dict, torch.Tensor, ...]:
        """This process's share of a split: the summed loss and token KL, and each answer's reward and log-probability
        (zero where another process has it)."""
        sums: dict[str, tuple[float, int]] = {}
        rewards, logps = (
            torch.zeros(len(split.seqs), dtype=torch.float64),
            torch.zeros(len(split.seqs), dtype=torch.float64),
        )
        n_units = split.units(self.kto)
        starts = range(0, n_units, batch_size)
        units = (self._batch(split, list(range(start, min(start + batch_size, n_units)))) for start in starts)
        for number, batch in my_shown_batches(units, len(starts), desc):  # this process's share of them
            batch = batch.to(hardware.device)
            batch.kl, rows = kl, batch.rows
            with hardware.autocast():
                policy, live, kl_sum = self._eval_scores(model, rows, hardware.loss_chunk_tokens)
                reference = live if batch.reference is None else batch.reference
            if number is None:  # run again to keep the processes' forward passes in step: adds the keys, not values
                for key in ("loss", "token_kl") if live is not None else ("loss",):
                    sums.setdefault(key, (0.0, 0))
                continue
            losses, parts = self._losses(policy, reference, rows.labels, batch)
            _add(sums, "loss", losses)
            if live is not None:  # per answer token, between the next-token distributions
                total, tokens = sums.get("token_kl", (0.0, 0))
                sums["token_kl"] = (total + kl_sum, tokens + int((rows.labels[:, 1:] != IGNORE).sum()))
            row_rewards = parts["rewards"] if self.kto else torch.cat([parts["chosen"], parts["rejected"]])
            rewards[batch.index] = row_rewards.double().cpu()
            logps[batch.index] = policy.double().cpu()
        return sums, rewards, logps

    @torch.no_grad()
    def policy_logps(self, model, split: PreferenceSplit, batch_size: int, hardware) -> dict:
        """The policy's mean log-probability of the chosen and of the rejected answers of a split's pairs, batched
        and computed as `evaluate` records them (chosen_logp, rejected_logp), with no reference: what an exported
        model is checked by (export --check)."""
        logps = torch.zeros(len(split.seqs), dtype=torch.float64)
        n_units = split.units(self.kto)
        for start in range(0, n_units, batch_size):
            batch = self._batch(split, list(range(start, min(start + batch_size, n_units)))).to(hardware.device)
            rows = batch.rows
            with hardware.autocast():
                hidden, head, picked, index = scored_head_inputs(model, rows.input_ids, rows.labels)
                policy = logprobs_and_kl((hidden, head), None, picked, index, len(rows.input_ids),
                                         hardware.loss_chunk_tokens)[0]  # fmt: skip
            logps[batch.index] = policy.double().cpu()
        return {"chosen_logp": float(logps[split.pairs[:, 0]].mean()),
                "rejected_logp": float(logps[split.pairs[:, 1]].mean()), "examples": n_units}  # fmt: skip

    def _eval_scores(self, model, rows: Rows, chunk_tokens: int):
        """The policy's log-probabilities of the rows' answers, the live reference's (None without one),
        and the summed token KL between them: one forward pass of each."""
        p_hidden, p_head, picked, index = scored_head_inputs(model, rows.input_ids, rows.labels)
        reference = self.reference.head_inputs(rows)
        return logprobs_and_kl((p_hidden, p_head), reference, picked, index, len(rows.input_ids), chunk_tokens)

    def sample_inputs(self, splits, prompts):
        """The first validation prompts through the template, the chosen (desirable) answer as the reference."""
        split = splits["validation"]
        first = [i for i in range(len(split.seqs)) if split.desirable[i]][: self.cfg.samples]
        inputs = []
        for i in first:
            example = split.examples[i]
            ids = self.tokenizer(generation_prompt(example, self.tokenizer, self.template),
                                 add_special_tokens=self.template != "chat")["input_ids"]  # fmt: skip
            user = next((m["content"] for m in reversed(example.messages) if m["role"] == "user"), "")
            inputs.append({"prompt": user[-500:], "reference": example.answer, "input_ids": ids[-self.block_size :]})
        return inputs, "the first validation prompts"

    def baseline_key(self) -> dict:
        """Jobs of a live reference share a baseline however it is kept (Reference.key)."""
        return {**self.describe(), "reference": self.reference.key()}

    def describe(self) -> dict:
        keys = ("beta", "label_smoothing", "gamma", "lambda_or", "cpo_alpha", "desirable_weight", "undesirable_weight")
        return {**super().describe(), "template": self.template, "reference": self.reference.kind,
                **{k: self.cfg[k] for k in keys}}  # fmt: skip


def _add(sums: dict, key: str, values: torch.Tensor) -> None:
    total, count = sums.get(key, (0.0, 0))
    sums[key] = (total + float(values.double().sum()), count + values.numel())

"""The reference model: the initial model's scores, for objectives that hold the policy near it (DPO, IPO, KTO).

Kept one of three ways (`Reference.kind`): the base model with its adapters disabled (peft
strategies: no second copy), a frozen copy of the initial model (the other strategies), or with
`objective.precompute_reference=true` its log-probabilities computed once before training and
cached on disk, keyed by its weights, the tokens scored and the settings. An objective without
a reference (CPO, ORPO, SimPO) has kind "none".
"""

import copy
import logging
from pathlib import Path

import torch

from transfer import cache
from transfer.data.sequences import Batch, Sequences, padded_batch
from transfer.data.sources import SPLITS
from transfer.errors import TransferError
from transfer.training.loss import scored_head_inputs, sequence_logprobs

log = logging.getLogger(__name__)


class Reference:
    """The reference of one objective of one run; `attach` sets it up on the initial model."""

    def __init__(self, objective: str, cfg, pad_id: int, needed: bool):
        self.objective, self.cfg, self.pad_id = objective, cfg, pad_id
        self.kind = "none" if not needed else None  # then "adapters disabled", "frozen copy" or "precomputed"
        self.frozen = None  # a frozen copy of the initial model, for strategies without adapters
        self.precomputed: dict[str, torch.Tensor] = {}  # per split, per sequence, when precomputed
        self._model = None

    def attach(self, model, splits: dict[str, Sequences], run_cfg, hardware, keep_live: bool) -> dict:
        """Set up on `model` while it is still the initial one; what the record says. `splits`: the sequences whose
        log-probabilities are precomputed, when they are; `keep_live`: a live reference is asked for even then."""
        self._model = model
        if self.kind == "none":
            return {"reference": "none"}
        peft = hasattr(model, "disable_adapter")
        self.kind = "adapters disabled" if peft else "frozen copy"
        if not peft:
            self.frozen = copy.deepcopy(model).eval().requires_grad_(False)
        info = {"reference": self.kind}
        if self.cfg.precompute_reference:
            info.update(self._precompute(model, splits, run_cfg, hardware))
            if not keep_live:
                self.frozen = None
            self.kind = "precomputed"
            info["reference"] = f"precomputed ({info['reference_of']})"
        return info

    def _precompute(self, model, splits: dict[str, Sequences], run_cfg, hardware) -> dict:
        folder = Path(self.cfg.reference_cache).expanduser()
        cache.writable(folder, "objective.reference_cache")  # before the log-probabilities are computed
        path = folder / f"{cache_key(model, splits, run_cfg, hardware)}.pt"
        names = [n for n in SPLITS if n in splits]
        kept = cache.load_tensors(path, names, "reference")
        if kept is not None and any(len(kept[n]) != len(splits[n]) for n in names):
            kept = cache.damaged(path, "reference", "its length differs from the split's answers")
        for name in names:
            self.precomputed[name] = (
                kept[name] if kept is not None else self._logps(splits[name], run_cfg.eval_batch_size, hardware)
            )
        if kept is None:
            cache.save_tensors(path, self.precomputed)
        hit = kept is not None
        log.info("reference log-probabilities %s %s", "read from" if hit else "computed and cached in", path)
        return {"reference_of": self.kind, "reference_cache": str(path), "reference_cache_hit": hit}

    @torch.no_grad()
    def _logps(self, seqs: Sequences, batch_size: int, hardware) -> torch.Tensor:
        """The reference's summed log-probability of every sequence's scored tokens, [sequences]."""
        out = []
        for start in range(0, len(seqs), batch_size):
            rows = padded_batch(seqs, list(range(start, min(start + batch_size, len(seqs)))), self.pad_id)
            with hardware.autocast():
                out.append(self.live(rows.to(hardware.device), hardware.loss_chunk_tokens).cpu())
        return torch.cat(out)

    def scores(self, rows: Batch, precomputed: torch.Tensor | None, chunk_tokens: int) -> torch.Tensor | None:
        """The reference's log-probabilities of the rows' answers (None without a reference), under the caller's
        autocast: the precomputed ones where the batch carries them."""
        if self.kind == "none":
            return None
        return precomputed if precomputed is not None else self.live(rows, chunk_tokens)

    @torch.no_grad()
    def live(self, rows: Batch, chunk_tokens: int) -> torch.Tensor:
        """The reference run now: the frozen copy, or the model with its adapters disabled, in eval mode."""
        if self.frozen is not None:
            return sequence_logprobs(self.frozen, rows.input_ids, rows.labels, chunk_tokens)
        if not hasattr(self._model, "disable_adapter"):
            raise TransferError(
                f"objective={self.objective}: no reference model is kept; set objective.precompute_reference=false"
            )
        was_training = self._model.training
        self._model.eval()
        try:
            with self._model.disable_adapter():
                return sequence_logprobs(self._model, rows.input_ids, rows.labels, chunk_tokens)
        finally:
            self._model.train(was_training)

    def head_inputs(self, rows: Batch) -> tuple | None:
        """The live reference's (head input, head) at the rows' scored positions (loss.scored_head_inputs), for the
        token KL of evaluation; None where no model is kept (no reference, or only precomputed log-probabilities)."""
        if self.frozen is not None:
            return scored_head_inputs(self.frozen, rows.input_ids, rows.labels)[:2]
        if self.kind != "none" and hasattr(self._model, "disable_adapter"):
            with self._model.disable_adapter():
                hidden, head = scored_head_inputs(self._model, rows.input_ids, rows.labels)[:2]
            # the caller applies the head after the adapters are on again: a head trained as modules_to_save would
            # answer then with its trained copy, so the reference's is the original module
            return hidden, getattr(head, "original_module", head)
        return None

    def to(self, device, dtype=None) -> None:
        if self.frozen is not None:
            self.frozen.to(device, dtype)

    def key(self) -> str:
        """A live reference is the initial model however it is kept (a frozen copy, or the adapters disabled: the same
        computation); precomputed log-probabilities are their own (the sweep cache's key of a baseline)."""
        return self.kind if self.kind in ("precomputed", "none") else "live"


def cache_key(model, splits: dict[str, Sequences], run_cfg, hardware) -> str:
    """Everything the reference's log-probabilities depend on: its weights (the base's, under the names a plain model
    gives them, so that every strategy's jobs share one reference), the tokens scored, the settings."""
    adapters = adapter_tensors(model)
    weights = []
    with torch.no_grad():
        for name, p in sorted(model.state_dict(keep_vars=True).items()):
            if id(p) in adapters:
                continue  # off for the reference
            plain = name.removeprefix("base_model.model.").replace(".base_layer.", ".").replace(
                ".original_module.", ".")  # fmt: skip
            weights.append(cache.digest(plain, p))  # one tensor at a time, as it is: no second copy of the model
    contents = [cache.digest(*splits[name].content()) for name in sorted(n for n in SPLITS if n in splits)]
    settings = [hardware.device.type, hardware.precision, run_cfg.model.dtype.value, run_cfg.eval_batch_size,
                hardware.loss_chunk_tokens, cache.environment()]  # fmt: skip
    return cache.digest(sorted(weights), contents, settings)[:32]


def adapter_tensors(model) -> set[int]:
    """The ids of the tensors that peft's layers declare their adapters' own (`adapter_layer_names`: LoRA's A and B,
    DoRA's magnitudes, IA3's vectors, the copies of modules_to_save): what disabling the adapters switches off."""
    found = set()
    for module in model.modules():
        for attr in getattr(type(module), "adapter_layer_names", ()):
            part = getattr(module, attr, None)
            if isinstance(part, torch.nn.Module):
                found.update(id(t) for t in (*part.parameters(), *part.buffers()))
    return found

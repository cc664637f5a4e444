"""Layer-wise diagnostics of what training changed: the relative weight change of each block, and
optionally how similar each block's representations stayed (linear CKA).

Weight change: ||W_after - W_before||_F / ||W_before||_F over a part's weights together: a decoder
block's weight matrices (and, apart, each module type inside it: q_proj, ..., down_proj), the
embeddings, the head, the final norm's vectors. W_after is what the final evaluation used (the best
or the last weights, as `eval.weights` says). For peft strategies the base stays frozen and the
update is the adapters merged as peft merges them, read as the strategy's row in
transfer/config/strategy.py says (`update`: "lora", `get_delta_weight` or DoRA's own merge; "ia3",
the scaling; "delta", the `get_delta_weight` of any tuner that merges by adding it; a
module_to_save's trained copy against its original). A peft layer no reader reads leaves the
weight change "not measured", naming the layer's type: the run that trained it still completes. The
other strategies compare with a CPU copy of the parameters that train, taken before training:
frozen ones cannot change, and their rows are exactly 0.

CKA: Kornblith et al. 2019, linear kernel, on each block's output at the real tokens of the first
`eval.cka_blocks` validation sequences, between the tuned model and its base (peft: adapters
disabled; others: the snapshot's weights put back for the while).

Under FSDP2 each process holds a shard of every parameter (dim 0): the snapshot keeps each
process's shard, and the squared norms of the shards add up to the whole tensor's.
"""

import contextlib
import math

import torch

from transfer.config.strategy import STRATEGIES
from transfer.data.sequences import padded_batch
from transfer.models.anatomy import base_model, model_parts
from transfer.training import checkpoint, distributed
from transfer.training.hardware import uncompiled


def snapshot(model) -> dict[str, torch.Tensor]:
    """The weights training will change, as they are before it, on the CPU; {} for peft, whose base stays frozen."""
    return {} if checkpoint.is_peft(model) else checkpoint.trainable_state(model)


def measure(model, before: dict, trainee, objective, splits: dict, cfg, hardware) -> dict:
    """The record's `diagnostics`: weight change always, CKA when `eval.cka` asks for it."""
    found = {"weight_change": weight_change(model, before, STRATEGIES[cfg.strategy.name].update)}
    if cfg.eval.cka:
        split = getattr(splits["validation"], "seqs", splits["validation"])  # preference splits hold their sequences
        found["cka"] = block_cka(trainee, before, split, cfg.eval.cka_blocks, cfg.eval_batch_size, hardware,
                                 objective.pad_id)  # fmt: skip
    return found


def describe(found: dict) -> str:
    """One log line: the part that changed most, and the least similar block."""
    change = found["weight_change"]
    if "largest" in change:
        largest = change["largest"]
        text = f"relative weight change ||dW||/||W||: largest in {largest['part']} ({largest['value']:.3g})"
    else:
        text = f"relative weight change: {change['measure']} ({change['reason']})"
    if "cka" in found:
        blocks = found["cka"]["blocks"]
        low = min(range(len(blocks)), key=blocks.__getitem__)
        text += f"; linear CKA with the base lowest at block {low} ({blocks[low]:.4g})"
    return text


# ---------------------------------------------------------------- weight change
def weight_change(model, before: dict, update: str | None = None) -> dict:
    """Relative change per block (and per module type in it), for the embeddings, the head and the final norm.

    `update`: how the strategy's peft layers are read (its row's `update`; None: no reader)."""
    parts = model_parts(model)
    names = {id(p): n for n, p in model.named_parameters()}
    rows = {f"block {i}": [block] for i, block in enumerate(parts.blocks)}
    rows.update(embeddings=parts.embeddings, final_norm=parts.final_norm, head=[parts.head] if parts.head else [])
    keys, sums = [], []
    try:
        with torch.no_grad():
            for row, modules in rows.items():
                for module in modules:
                    for path, base, delta in _weights(module, before, names, update):
                        if base.dim() < 2 and row != "final_norm":  # biases and norm scales: not the block's matrices
                            continue
                        keys.append((row, path.split(".")[-1] or type(module).__name__))
                        sums.append([_squared(delta), _squared(base)])
    except _Unread as unread:
        return {"measure": "not measured", "layer": unread.layer, "reason": str(unread)}
    totals = torch.tensor(sums, dtype=torch.float64).reshape(-1, 2)
    sharded = any(hasattr(p, "device_mesh") for p in model.parameters())
    if sharded and distributed.active():  # the squares of every process's shards add up to the whole's
        totals = distributed.summed(totals, next(model.parameters()).device).cpu()
    return _relative(keys, totals.tolist(), len(parts.blocks))


def _relative(keys: list[tuple], sums: list[list[float]], depth: int) -> dict:
    by_row, by_module = {}, {}
    for (row, module), (changed, base) in zip(keys, sums, strict=True):
        for table, key in ((by_row, row), (by_module, (row, module))):
            table.setdefault(key, [0.0, 0.0])
            table[key][0] += changed
            table[key][1] += base
    ratio = lambda key, table=by_row: _ratio(*table[key]) if key in table else None  # noqa: E731
    blocks = [ratio(f"block {i}") for i in range(depth)]
    types = dict.fromkeys(module for row, module in by_module if row.startswith("block "))
    result = {
        "measure": "||W_after - W_before||_F / ||W_before||_F over each part's weight matrices (final norm: its vectors)",
        "blocks": blocks,
        "modules": {m: [ratio((f"block {i}", m), by_module) for i in range(depth)] for m in types},
        **{part: ratio(part) for part in ("embeddings", "final_norm", "head")},
    }
    measured = {row: _ratio(*v) for row, v in by_row.items() if v[1] > 0}
    part = max(measured, key=measured.get)
    result["largest"] = {"part": part, "value": measured[part]}
    return result


def _ratio(changed: float, base: float) -> float | None:
    return math.sqrt(changed / base) if base > 0 else None


def _squared(t: torch.Tensor | None) -> float:
    """The squared Frobenius norm, each row's in float32 and their sum in float64: within 1e-6 relative of a float64
    sum for float32 weights, 1e-5 for bf16 ones (tests/test_diagnostics.py).

    One float32 sum over a whole matrix drifts (4 % on Qwen2.5-Coder-0.5B's embedding matrix); a float64 one is exact
    enough but ten times slower on a CPU, which made it most of a minute of every run at that size (docs/qwen.md).
    """
    if t is None:
        return 0.0
    rows = t.reshape(-1, t.shape[-1]) if t.dim() > 1 else t.reshape(1, -1)
    return float(torch.linalg.vector_norm(rows, dim=-1, dtype=torch.float32).double().square().sum())


def _weights(module, before: dict, names: dict, update: str | None, path: str = ""):
    """(module path, W_before, W_after - W_before or None where it cannot have changed) per weight under `module`."""
    if type(module).__module__.startswith("peft."):  # peft is imported only for peft models
        yield from _peft_reader(module, update)(module, path)
        return
    for p in module.parameters(recurse=False):
        after, old = distributed.local(p), before.get(names[id(p)])
        if old is None:  # frozen: not copied, not changed
            yield path, after, None
        else:
            old = old.to(after.device)
            yield path, old, after.float() - old.float()
    for name, child in module.named_children():
        yield from _weights(child, before, names, update, f"{path}.{name}" if path else name)


class _Unread(Exception):
    """A peft layer whose update no reader reads: the weight change is not measured."""

    def __init__(self, module, update: str | None):
        self.layer = f"{type(module).__module__}.{type(module).__name__}"
        how = f"the strategy's update {update!r} does not read it" if update else "the strategy names no update reader"
        super().__init__(f"peft's {type(module).__name__} layers: {how}")


def _peft_reader(module, update: str | None):
    """The reader of a peft module: the strategy's, for its tuner layers; a module_to_save's own."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import ModulesToSaveWrapper

    if isinstance(module, ModulesToSaveWrapper):
        return _saved
    reader = READERS.get(update)
    if isinstance(module, BaseTunerLayer) and reader is not None and reader[0](module):
        return reader[1]
    raise _Unread(module, update)


def _lora(layer, path: str):
    from peft.utils.integrations import dequantize_module_weight

    base = dequantize_module_weight(layer.get_base_layer()).detach()
    delta = torch.zeros_like(base, dtype=torch.float32)
    for adapter in layer.active_adapters:  # one ("default") in this project's strategies
        if adapter in layer.lora_variant:  # DoRA: the magnitude rescales W + BA, so the merge says what changed
            merged = layer.lora_variant[adapter].merge_safe(layer, adapter, base.clone())
            layer._caches.pop(f"{adapter}-weight_norm", None)  # what merge_safe keeps for an unmerge that never comes
            delta += merged.float() - base.float()
        else:
            delta += layer.get_delta_weight(adapter).float()
    yield path, base, delta


def _ia3(layer, path: str):
    from peft.utils.other import transpose

    base = layer.get_base_layer().weight.detach()
    scale = sum(transpose(layer.ia3_l[a].detach(), layer.fan_in_fan_out) for a in layer.active_adapters)
    yield path, base, base * scale - base  # IA3Layer.merge multiplies the weight by the vector


def _saved(wrapper, path: str):
    trained = wrapper.modules_to_save[wrapper.active_adapters[0]]
    pairs = zip(wrapper.original_module.named_parameters(), trained.named_parameters(), strict=True)
    for (_, old), (_, new) in pairs:
        yield path, old.detach(), new.detach().float() - old.detach().float()


def _delta(layer, path: str):
    """A tuner that merges by adding `get_delta_weight` to the base weight (LoHa, LoKr, VeRA, plain LoRA)."""
    from peft.utils.integrations import dequantize_module_weight

    base = dequantize_module_weight(layer.get_base_layer()).detach()
    delta = sum(layer.get_delta_weight(adapter).float() for adapter in layer.active_adapters)
    yield path, base, delta


def _is(class_name: str):
    return lambda layer: class_name in {c.__name__ for c in type(layer).__mro__}


# a strategy row's `update` -> (which peft layers it can read, how)
READERS = {
    "lora": (_is("LoraLayer"), _lora),
    "ia3": (_is("IA3Layer"), _ia3),
    "delta": (lambda layer: callable(getattr(layer, "get_delta_weight", None)), _delta),
}


# ---------------------------------------------------------------- linear CKA
def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of two representations of the same n examples ([n, d] and [n, d']): 1 for the same up to
    rotation and scale. ||YᵀX||²_F / (||XᵀX||_F ||YᵀY||_F) with centred columns (Kornblith et al. 2019)."""
    x = x.double() - x.double().mean(0)
    y = y.double() - y.double().mean(0)
    return float(_hsic(x, y) / torch.sqrt(_hsic(x, x) * _hsic(y, y)))


def _hsic(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """||YᵀX||²_F, which equals <XXᵀ, YYᵀ>_F: whichever of the two is cheaper (d x d' or n x n products)."""
    if len(x) < max(x.shape[1], y.shape[1]):
        return ((x @ x.T) * (y @ y.T)).sum()
    return (y.T @ x).square().sum()


def block_cka(trainee, before: dict, split, count: int, batch_size: int, hardware, pad_id: int) -> dict:
    """CKA between the tuned and the base model at each block's output, over the first `count` sequences' tokens.

    The weights are swapped between forward passes, where FSDP2 keeps every parameter sharded."""
    model, indices = trainee.model, list(range(min(count, len(split))))
    tuned = trainee.use(_block_outputs, split, indices, batch_size, hardware, pad_id)
    if hasattr(model, "peft_config"):
        base_of, base = model.disable_adapter, "adapters disabled"
    else:
        base_of, base = (lambda: _swapped(model, before)), "the weights before training"
    with base_of():
        original = trainee.use(_block_outputs, split, indices, batch_size, hardware, pad_id)
    return {
        "base": base,
        "sequences": len(indices),
        "tokens": len(tuned[0]),
        "blocks": [linear_cka(a, b) for a, b in zip(tuned, original, strict=True)],
    }


@torch.no_grad()
def _block_outputs(model, split, indices: list[int], batch_size: int, hardware, pad_id: int) -> list[torch.Tensor]:
    """Each block's output at the real tokens of `indices`, [tokens, hidden] per block, in float32."""
    base = base_model(model)
    blocks = model_parts(model).blocks
    found = [[] for _ in blocks]
    lengths = split.lengths()

    def keep(i, _module, _inputs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        found[i].append(hidden.float())

    hooks = [block.register_forward_hook(lambda *a, i=i: keep(i, *a)) for i, block in enumerate(blocks)]
    was_training = model.training
    model.eval()  # no dropout: the same tokens give the same features
    try:
        for start in range(0, len(indices), batch_size):
            rows = indices[start : start + batch_size]
            batch = padded_batch(split, rows, pad_id).to(hardware.device)
            with hardware.autocast(), uncompiled():
                base.get_decoder()(input_ids=batch.input_ids)
            real = torch.arange(batch.input_ids.shape[1]) < lengths[rows][:, None]  # right padding left out
            for outputs in found:
                outputs[-1] = outputs[-1][real.to(outputs[-1].device)]
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return [torch.cat(outputs) for outputs in found]


@contextlib.contextmanager
def _swapped(model, before: dict):
    """The snapshot's weights in the model for the while, the trained ones back after: an exact round trip."""
    trained = checkpoint.trainable_state(model)
    checkpoint.restore_trainable(model, before)
    try:
        yield
    finally:
        checkpoint.restore_trainable(model, trained)

"""Layer-wise diagnostics: the relative weight change by its formula, peft's merged update, linear CKA's
properties, and a real run's record (transfer/evaluation/diagnostics.py)."""

import copy
import json
import math

import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from transfer.aggregate import plots
from transfer.aggregate.output import aggregate
from transfer.config.checks import check_config
from transfer.config.compose import compose_config
from transfer.config.strategy import STRATEGIES, StrategySpec
from transfer.data.sequences import Sequences
from transfer.errors import TransferError
from transfer.evaluation import diagnostics
from transfer.evaluation.diagnostics import block_cka, linear_cka, snapshot, weight_change
from transfer.run import run_experiment
from transfer.strategies import apply_strategy
from transfer.training.distributed import Trainee
from transfer.training.hardware import resolve

LAYERS = 3
MATRICES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def small_qwen2() -> torch.nn.Module:
    torch.manual_seed(0)
    config = Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64, max_position_embeddings=64, tie_word_embeddings=False)  # fmt: skip
    return AutoModelForCausalLM.from_config(config).eval()


def block_matrices(state: dict, i: int) -> dict:
    return {n: w for n, w in state.items() if n.startswith(f"model.layers.{i}.") and w.dim() >= 2}


def relative(before: dict, after: dict) -> float:
    """||after - before||_F / ||before||_F over the tensors together, in float64."""
    changed = sum(float((after[n].double() - w.double()).square().sum()) for n, w in before.items())
    return math.sqrt(changed / sum(float(w.double().square().sum()) for w in before.values()))


# ---------------------------------------------------------------- the weight change
def test_squared_norms_are_float64_sums_to_within_1e6_for_float32_and_1e5_for_bf16():
    """Summed in float32 over a whole matrix, 16M squares of about 1 drift by 9e-6 (4 % on a real 136M-element
    embedding matrix); float64 throughout is ten times slower on a CPU. Rows in float32, summed in float64, are both."""
    weights = torch.ones(4096, 4096) + torch.randn(4096, 4096, generator=torch.Generator().manual_seed(0)) * 1e-2
    for w, tolerance in ((weights, 1e-6), (weights.bfloat16(), 1e-5), (weights[0], 1e-6)):
        exact = float(w.double().square().sum())
        assert diagnostics._squared(w) == pytest.approx(exact, rel=tolerance)
    assert diagnostics._squared(None) == 0.0


def test_a_known_update_gives_the_formula_and_untouched_parts_exactly_zero():
    model = small_qwen2()
    initial = snapshot(model)  # full fine-tuning: every parameter trains, so every one is copied
    assert set(initial) == {n for n, _ in model.named_parameters()}
    with torch.no_grad():
        layer = model.model.layers[1]
        layer.self_attn.q_proj.weight.add_(0.01)
        layer.mlp.down_proj.weight.mul_(1.5)
        layer.input_layernorm.weight.add_(1.0)  # a vector: not one of the block's matrices
        model.lm_head.weight.add_(torch.randn_like(model.lm_head.weight) * 0.02)
    after = {n: p.detach() for n, p in model.named_parameters()}
    found = weight_change(model, initial)

    old = block_matrices(initial, 1)
    # to 1e-7: the norms are summed in float32 row by row (diagnostics._squared)
    assert found["blocks"][1] == pytest.approx(relative(old, after), rel=1e-7)
    assert found["blocks"][0] == 0.0 and found["blocks"][2] == 0.0 and found["embeddings"] == 0.0
    assert found["final_norm"] == 0.0
    head = {"lm_head.weight": initial["lm_head.weight"]}
    assert found["head"] == pytest.approx(relative(head, after), rel=1e-7)
    assert list(found["modules"]) == list(MATRICES)
    q = {"model.layers.1.self_attn.q_proj.weight": initial["model.layers.1.self_attn.q_proj.weight"]}
    assert found["modules"]["q_proj"][1] == pytest.approx(relative(q, after), rel=1e-7)
    assert found["modules"]["down_proj"][1] == pytest.approx(0.5, rel=1e-6)  # W * 1.5 - W = W / 2
    assert found["modules"]["k_proj"] == [0.0, 0.0, 0.0]
    rows = {**{f"block {i}": v for i, v in enumerate(found["blocks"])}, "head": found["head"]}
    assert found["largest"] == {"part": max(rows, key=rows.get), "value": max(rows.values())}


def lora_like(overrides: list[str], perturb) -> tuple:
    """A peft strategy on the small model, its adapters set away from their no-op start; and the model before."""
    plain = small_qwen2()
    model, _ = apply_strategy(copy.deepcopy(plain), compose_config(overrides).strategy)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                perturb(name, p)
    return plain, model


PEFT = {
    "lora": (["strategy=lora", "strategy.modules_to_save=[head]"], lambda n, p: p.add_(torch.randn_like(p) * 0.1)),
    "dora": (["strategy=dora"], lambda n, p: p.mul_(1.2) if "magnitude" in n else p.add_(torch.randn_like(p) * 0.1)),
    "ia3": (["strategy=ia3"], lambda n, p: p.uniform_(0.5, 1.5)),
}


def blocks_as_merged(found: dict, plain, model) -> tuple[dict, dict]:
    """Each block's change is the one peft's merge makes, and not 0; the weights before and after the merge."""
    merged = copy.deepcopy(model).merge_and_unload()
    base = {n: p.detach() for n, p in plain.named_parameters()}
    after = {n: p.detach() for n, p in merged.named_parameters()}
    for i in range(LAYERS):
        assert found["blocks"][i] == pytest.approx(relative(block_matrices(base, i), after), rel=1e-4)
        assert found["blocks"][i] > 0
    return base, after


@pytest.mark.parametrize("kind", PEFT)
def test_the_peft_update_is_what_peft_merges(kind):
    plain, model = lora_like(*PEFT[kind])
    found = weight_change(model, snapshot(model), STRATEGIES[kind].update)
    assert snapshot(model) == {}  # the base is frozen: nothing to copy
    base, after = blocks_as_merged(found, plain, model)
    v = "model.layers.2.self_attn.v_proj.weight"
    assert found["modules"]["v_proj"][2] == pytest.approx(relative({v: base[v]}, after), rel=1e-4)
    head = relative({"lm_head.weight": base["lm_head.weight"]}, after)
    assert found["head"] == pytest.approx(head, rel=1e-6)
    assert (found["head"] > 0) == (kind == "lora")  # only lora saves the head here
    assert found["embeddings"] == 0.0 and found["final_norm"] == 0.0


def test_every_strategys_update_has_a_reader():
    assert {spec.update for spec in STRATEGIES.values()} - {None} <= set(diagnostics.READERS)
    assert all(spec.update for spec in STRATEGIES.values() if spec.peft)  # none of today's goes unmeasured


def lokr_like() -> tuple:
    """A peft tuner no strategy of the project uses (LyCORIS's Kronecker product), moved off its no-op start."""
    from peft import LoKrConfig, get_peft_model

    plain = small_qwen2()
    model = get_peft_model(copy.deepcopy(plain), LoKrConfig(r=4, alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    return plain, model


def test_a_tuner_that_adds_its_delta_weight_is_read_as_peft_merges_it():
    plain, model = lokr_like()
    found = weight_change(model, {}, "delta")
    blocks_as_merged(found, plain, model)


@pytest.mark.parametrize("update", [None, "lora", "ia3"])
def test_a_peft_layer_no_reader_reads_is_not_measured_and_named(update):
    _, model = lokr_like()
    found = weight_change(model, {}, update)
    assert found["measure"] == "not measured" and found["layer"] == "peft.tuners.lokr.layer.Linear"
    assert "peft's Linear layers" in found["reason"]


def test_a_finished_run_whose_peft_layers_are_not_read_records_so(monkeypatch):
    """What the run calls after training: a strategy row without a reader leaves a record, not a traceback."""
    monkeypatch.setitem(STRATEGIES, "lora", StrategySpec(peft=True, mergeable=True))  # as if lora had no reader
    cfg = compose_config(["strategy=lora"])
    _, model = lora_like(["strategy=lora"], lambda n, p: p.add_(0.1))
    found = diagnostics.measure(model, {}, None, None, {}, cfg, None)
    assert found["weight_change"]["measure"] == "not measured"
    assert found["weight_change"]["layer"] == "peft.tuners.lora.layer.Linear"
    assert diagnostics.describe(found) == (
        "relative weight change: not measured (peft's Linear layers: the strategy names no update reader)"
    )


# ---------------------------------------------------------------- linear CKA
def cka_by_centring_matrix(x: torch.Tensor, y: torch.Tensor) -> float:
    """Kornblith et al. 2019: HSIC(K, L) = tr(KHLH) / (n - 1)^2 with linear kernels, CKA its normalised form."""
    x, y = x.double(), y.double()
    n = len(x)
    h = torch.eye(n, dtype=torch.float64) - 1.0 / n
    hsic = lambda k, l: torch.trace(k @ h @ l @ h) / (n - 1) ** 2  # noqa: E731, E741
    k, l = x @ x.T, y @ y.T  # noqa: E741
    return float(hsic(k, l) / torch.sqrt(hsic(k, k) * hsic(l, l)))


@pytest.mark.parametrize("n", [20, 300], ids=["fewer examples than features", "more examples than features"])
def test_linear_cka_is_the_papers_formula_and_has_its_invariances(n):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 40, generator=g)
    y = x @ torch.randn(40, 30, generator=g) + torch.randn(n, 30, generator=g)
    assert linear_cka(x, y) == pytest.approx(cka_by_centring_matrix(x, y), rel=1e-10)
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    rotation, _ = torch.linalg.qr(torch.randn(40, 40, generator=g, dtype=torch.float64))
    assert linear_cka(x, x.double() @ rotation) == pytest.approx(1.0, abs=1e-10)
    assert linear_cka(x, 3.7 * x + 5.0) == pytest.approx(1.0, abs=1e-10)  # scale, and a shift centring removes
    other = linear_cka(x, torch.randn(n, 40, generator=g))
    assert 0 < other < 0.9


def validation_split(count: int, length: int) -> Sequences:
    g = torch.Generator().manual_seed(1)
    ids = [torch.randint(0, 64, (length - i,), generator=g).tolist() for i in range(count)]  # ragged: padding
    return Sequences.from_lists(ids, ids)


def test_block_cka_puts_the_trained_weights_back_and_sees_where_they_changed():
    model = small_qwen2()
    initial = snapshot(model)
    with torch.no_grad():
        model.model.layers[2].mlp.up_proj.weight.add_(torch.randn(64, 32) * 0.5)
    tuned = {n: p.detach().clone() for n, p in model.named_parameters()}
    hardware = resolve(compose_config(["hardware=cpu"]).hardware)
    found = block_cka(Trainee(model, hardware.device), initial, validation_split(3, 12), 2, 1, hardware, pad_id=0)
    assert found["sequences"] == 2 and found["tokens"] == 12 + 11  # the padding of the shorter one left out
    assert found["blocks"][:2] == [pytest.approx(1.0, abs=1e-12)] * 2  # below the change: the same features
    assert found["blocks"][2] < 1 - 1e-6
    assert all(torch.equal(p, tuned[n]) for n, p in model.named_parameters())  # bit for bit the trained weights


def test_block_cka_of_peft_compares_with_the_adapters_disabled():
    _, model = lora_like(["strategy=lora"], lambda n, p: p.zero_() if "lora_B" in n else None)
    hardware = resolve(compose_config(["hardware=cpu"]).hardware)
    split = validation_split(2, 10)
    trainee = Trainee(model, hardware.device)
    assert block_cka(trainee, {}, split, 2, 2, hardware, 0)["blocks"] == [pytest.approx(1.0, abs=1e-12)] * LAYERS
    with torch.no_grad():
        model.base_model.model.model.layers[0].self_attn.v_proj.lora_B["default"].weight.normal_(0, 0.5)
    found = block_cka(trainee, {}, split, 2, 2, hardware, 0)
    assert found["base"] == "adapters disabled" and all(v < 1 - 1e-6 for v in found["blocks"])


def test_cka_blocks_below_one_is_one_line():
    with pytest.raises(TransferError, match=r"^eval.cka_blocks=0 must be at least 1$"):
        check_config(compose_config(["eval.cka_blocks=0"]))


# ---------------------------------------------------------------- a real run
RUN = [
    "strategy=freeze_lower", "max_steps=6", "eval_interval=3", "block_size=64", "micro_batch_size=4",
    "eval_batch_size=32", "eval.max_tokens=1024", "eval/probes=[]", "model=tiny_random", "eval.max_new_tokens=4",
    "hardware.estimate_memory=false", "checkpoint.enabled=false", "optimizer.lr=1e-3",
]  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[dict, dict]:
    """freeze_lower with CKA; the same run whose snapshot copies nothing (and so no diagnostics to speak of)."""
    root = tmp_path_factory.mktemp("diagnostics")
    with_cka = run_experiment(compose_config([*RUN, "eval.cka=true", "eval.cka_blocks=3"]), root / "cka", {})
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(diagnostics, "snapshot", lambda model: {})
        without = run_experiment(compose_config(RUN), root / "plain", {})
    return with_cka, without


def test_a_run_records_frozen_blocks_at_zero_and_changes_nothing(runs):
    record, plain = runs
    assert record["status"] == "completed", record["error"]
    change, cka = record["diagnostics"]["weight_change"], record["diagnostics"]["cka"]
    depth = record["params"]["num_blocks"]
    trained = record["params"]["trainable_blocks"]
    frozen = [i for i in range(depth) if i not in trained]
    assert frozen and trained and len(change["blocks"]) == len(cka["blocks"]) == depth
    assert [change["blocks"][i] for i in frozen] == [0.0] * len(frozen)
    assert all(change["blocks"][i] > 0 for i in trained) and change["final_norm"] > 0
    assert change["embeddings"] == 0.0  # freeze_lower freezes them, and a head tied to them
    assert change["head"] == 0.0 if record["params"]["tied_embeddings"] else change["head"] > 0
    assert [cka["blocks"][i] for i in frozen] == [pytest.approx(1.0, abs=1e-9)] * len(frozen)  # same input, weights
    assert all(cka["blocks"][i] < 1 for i in trained)
    assert cka["sequences"] == 3 and cka["base"] == "the weights before training"
    # the copy and the CKA (which puts the old weights in and back) left the training and the evaluation alone
    assert record["train"]["loss_curve"] == plain["train"]["loss_curve"]
    assert record["eval"]["final"] == plain["eval"]["final"] and record["samples"] == plain["samples"]
    assert "cka" not in plain["diagnostics"]


def test_a_sweep_keeps_the_per_block_change_out_of_jobs_csv_and_plots_its_mean_over_seeds(runs, tmp_path, monkeypatch):
    record, _ = runs
    blocks = record["diagnostics"]["weight_change"]["blocks"]
    made = [("freeze_lower", 0, 1.0), ("freeze_lower", 1, 3.0), ("lora", 0, 0.5)]  # strategy, seed, scale
    for job, (strategy, seed, scale) in enumerate(made):
        job_record = copy.deepcopy(record)
        job_record.update(choices={"strategy": strategy}, overrides=[])
        job_record["config"]["seed"] = seed
        job_record["diagnostics"]["weight_change"]["blocks"] = [scale * v for v in blocks]
        (tmp_path / "sweep" / str(job)).mkdir(parents=True)
        (tmp_path / "sweep" / str(job) / "metrics.json").write_text(json.dumps(job_record))
    drawn, save = {}, plots._save

    def keep_lines(fig, path):
        drawn[path.name] = {line.get_label(): list(line.get_ydata()) for line in fig.axes[0].lines}
        return save(fig, path)

    monkeypatch.setattr(plots, "_save", keep_lines)
    jobs, _, files = aggregate([tmp_path / "sweep"])
    assert jobs["weight_change"].tolist() == [blocks, [3 * v for v in blocks], [0.5 * v for v in blocks]]
    assert "weight_change.png" in [f.name for f in files]
    assert drawn["weight_change.png"]["freeze_lower"] == pytest.approx([2 * v for v in blocks], rel=1e-12)
    assert drawn["weight_change.png"]["lora"] == pytest.approx([0.5 * v for v in blocks], rel=1e-12)
    assert "weight_change" not in pd.read_csv(tmp_path / "sweep" / "tables" / "jobs.csv").columns

"""Strategies: exact parameter accounting, architecture coverage, and what really trains."""

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import run_cli, run_ok
from transformers import AutoModelForCausalLM, GPT2Config, GPTNeoXConfig, LlamaConfig, Qwen2Config, Qwen3Config

from transfer.config.compose import compose_config
from transfer.errors import TransferError
from transfer.models.anatomy import model_parts, parameter_report
from transfer.models.load import load_model_and_tokenizer
from transfer.objectives import build_objective
from transfer.strategies import APPLY, apply_strategy, check_before_loading
from transfer.train import train
from transfer.training.hardware import resolve

# ---------------------------------------------------------------- Qwen2-0.5B, by hand
H, LAYERS, HEAD_DIM, KV_HEADS, INTER, VOCAB = 896, 24, 64, 2, 4864, 151_936
KV = KV_HEADS * HEAD_DIM  # 128: k and v project to 2 heads of 64
Q_PROJ = H * H + H  # weight + bias
K_PROJ = V_PROJ = H * KV + KV
O_PROJ = H * H  # no bias
MLP = 3 * H * INTER  # gate, up, down
NORMS = 2 * H  # input and post-attention RMSNorm
BLOCK = Q_PROJ + K_PROJ + V_PROJ + O_PROJ + MLP + NORMS  # 14,912,384
EMBED = VOCAB * H  # 136,134,656, shared with the head (tied)
FINAL_NORM = H
TOTAL = EMBED + LAYERS * BLOCK + FINAL_NORM
# LoRA r=16 on q, k, v, o, gate, up, down: A is r x in, B is out x r
R = 16
LORA_BLOCK = R * ((H + H) + (H + KV) + (H + KV) + (H + H) + (H + INTER) + (H + INTER) + (INTER + H))
# DoRA adds one magnitude per output feature of each adapted layer
DORA_BLOCK = LORA_BLOCK + (H + KV + KV + H + INTER + INTER + H)
# IA3 (peft's Qwen2 default): a vector over the outputs of q and v, and over the inputs of down (feed-forward)
IA3_BLOCK = H + KV + INTER


def qwen2_0_5b_shape(layers=LAYERS):
    config = Qwen2Config(
        hidden_size=H,
        num_hidden_layers=layers,
        num_attention_heads=14,
        num_key_value_heads=KV_HEADS,
        intermediate_size=INTER,
        vocab_size=VOCAB,
        tie_word_embeddings=True,
        max_position_embeddings=32768,
    )
    with torch.device("meta"):  # shapes only: no memory, no time
        return AutoModelForCausalLM.from_config(config)


def apply_on_qwen2_shape(*overrides):
    with torch.device("meta"):
        model, _ = apply_strategy(qwen2_0_5b_shape(), compose_config(list(overrides)).strategy)
    return parameter_report(model)


def qwen2_counts(h, layers, kv, inter, vocab, r=16):
    """(trainable, total) of each strategy's defaults on a tied Qwen2 shape, by the formulas above: no model, no
    parameter_report, so that the record is checked against figures the project's code did not produce."""
    block = (h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * inter + 2 * h
    embed, total = vocab * h, vocab * h + layers * block + h
    lora = r * ((h + h) + 2 * (h + kv) + (h + h) + 2 * (h + inter) + (inter + h))
    dora = lora + (h + 2 * kv + h + 2 * inter + h)
    half = layers - layers // 2  # freeze_lower's default freezes half the depth; adapter's trains the top 2
    return {
        "full": (total, total), "scratch": (total, total), "freeze_embeddings": (total - embed, total),
        "freeze_lower": (half * block + h, total), "adapter": (2 * block + h, total),
        "lora": (layers * lora, total + layers * lora), "dora": (layers * dora, total + layers * dora),
        "ia3": (layers * (h + kv + inter), total + layers * (h + kv + inter)),
    }  # fmt: skip


def test_the_hand_derived_figures_are_the_published_ones():
    assert BLOCK == 14_912_384
    assert TOTAL == 494_032_768  # Qwen2-0.5B's parameter count
    assert qwen2_counts(H, LAYERS, KV, INTER, VOCAB) == {
        "full": (TOTAL, TOTAL), "scratch": (TOTAL, TOTAL), "freeze_embeddings": (TOTAL - EMBED, TOTAL),
        "freeze_lower": (12 * BLOCK + FINAL_NORM, TOTAL), "adapter": (2 * BLOCK + FINAL_NORM, TOTAL),
        "lora": (LAYERS * LORA_BLOCK, TOTAL + LAYERS * LORA_BLOCK),
        "dora": (LAYERS * DORA_BLOCK, TOTAL + LAYERS * DORA_BLOCK),
        "ia3": (LAYERS * IA3_BLOCK, TOTAL + LAYERS * IA3_BLOCK),
    }  # fmt: skip


@pytest.mark.parametrize(
    "overrides,trainable,total",
    [
        (["strategy=full"], TOTAL, TOTAL),
        (["strategy=scratch"], TOTAL, TOTAL),
        (["strategy=freeze_embeddings"], 357_898_112, TOTAL),
        # the tied matrix is the head: frozen with the embeddings by default ...
        (["strategy=freeze_lower", "strategy.frozen_blocks=12"], 12 * BLOCK + FINAL_NORM, TOTAL),
        (["strategy=freeze_lower"], 12 * BLOCK + FINAL_NORM, TOTAL),  # default: half the depth
        # ... and trained when the config says so
        (
            ["strategy=freeze_lower", "strategy.frozen_blocks=12", "strategy.train_tied_embeddings=true"],
            315_084_160,
            TOTAL,
        ),
        (["strategy=adapter"], 2 * BLOCK + FINAL_NORM, TOTAL),
        (["strategy=adapter", "strategy.train_tied_embeddings=true"], 2 * BLOCK + FINAL_NORM + EMBED, TOTAL),
        (["strategy=lora"], LAYERS * LORA_BLOCK, TOTAL + LAYERS * LORA_BLOCK),
        (["strategy=dora"], LAYERS * DORA_BLOCK, TOTAL + LAYERS * DORA_BLOCK),
        (["strategy=ia3"], LAYERS * IA3_BLOCK, TOTAL + LAYERS * IA3_BLOCK),
    ],
)
def test_qwen2_0_5b_counts(overrides, trainable, total):
    report = apply_on_qwen2_shape(*overrides)
    assert report["trainable"] == trainable
    assert report["total"] == total
    assert sum(report["breakdown"].values()) == trainable
    assert report["tied_embeddings"] is True


def test_qwen2_0_5b_freeze_embeddings_is_total_minus_the_shared_matrix():
    assert 357_898_112 == TOTAL - EMBED
    assert 315_084_160 == EMBED + 12 * BLOCK + FINAL_NORM


def test_breakdown_and_trainable_blocks():
    r = apply_on_qwen2_shape("strategy=freeze_lower", "strategy.frozen_blocks=0.25")
    assert r["trainable_blocks"] == list(range(6, 24))
    assert r["breakdown"] == {"embeddings": 0, "blocks": 18 * BLOCK, "final_norm": H, "head": 0, "peft": 0}
    assert r["shared_matrix_trains"] is False
    r = apply_on_qwen2_shape("strategy=adapter", "strategy.trained_blocks=3", "strategy.train_tied_embeddings=true")
    assert r["trainable_blocks"] == [21, 22, 23]
    assert r["breakdown"]["embeddings"] == EMBED and r["breakdown"]["head"] == 0  # counted once
    assert r["shared_matrix_trains"] is True
    r = apply_on_qwen2_shape("strategy=lora", "strategy.target_modules=[q_proj,v_proj]", "strategy.r=8")
    assert r["trainable"] == LAYERS * 8 * ((H + H) + (H + KV))
    assert r["trainable_blocks"] == [] and r["breakdown"]["peft"] == r["trainable"]


def test_lora_modules_to_save_trains_one_copy_of_the_tied_matrix():
    r = apply_on_qwen2_shape("strategy=lora", "strategy.modules_to_save=[head]")
    # peft trains a copy and keeps the original frozen; head and embeddings share the copy
    assert r["trainable"] == LAYERS * LORA_BLOCK + EMBED
    assert r["total"] == TOTAL + LAYERS * LORA_BLOCK + EMBED
    assert r["breakdown"]["embeddings"] == EMBED and r["breakdown"]["head"] == 0
    assert r["shared_matrix_trains"] is True


def test_every_strategy_has_a_function_a_row_and_an_option_file():
    import transfer
    from transfer.config.strategy import STRATEGIES as ROWS

    options = Path(transfer.__file__).parent / "conf" / "strategy"
    assert set(APPLY) == set(ROWS) == {p.stem for p in options.glob("*.yaml")}
    assert all(ROWS[row.estimate_as] for row in ROWS.values() if row.estimate_as)


# ---------------------------------------------------------------- other architectures
def small(config_cls, **kw):
    return AutoModelForCausalLM.from_config(config_cls(**kw))


ARCHS = {
    "qwen2": lambda: small(
        Qwen2Config,
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=300,
    ),  # fmt: skip
    "qwen3": lambda: small(
        Qwen3Config,
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=128,
        vocab_size=300,
    ),  # fmt: skip
    "llama": lambda: small(
        LlamaConfig, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128, vocab_size=300
    ),  # fmt: skip
    "gpt2": lambda: small(GPT2Config, n_embd=64, n_layer=4, n_head=4, vocab_size=300, bos_token_id=0, eos_token_id=0),
    "gpt_neox": lambda: small(
        GPTNeoXConfig, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128, vocab_size=300
    ),  # fmt: skip
}


@pytest.mark.parametrize("arch", ARCHS)
def test_architectures_are_mapped_by_their_own_accessors(arch):
    model = ARCHS[arch]()
    parts = model_parts(model)
    assert len(parts.blocks) == 4
    every = {id(p) for p in model.parameters()}
    mapped = {id(p) for m in [*parts.blocks, *parts.embeddings, *parts.final_norm, parts.head] for p in m.parameters()}
    assert mapped == every, "some parameters belong to no part"
    block = sum(p.numel() for p in parts.blocks[0].parameters())
    emb = sum(p.numel() for m in parts.embeddings for p in m.parameters())
    norm = sum(p.numel() for m in parts.final_norm for p in m.parameters())
    head = 0 if parts.tied else parts.head.weight.numel()
    assert emb + 4 * block + norm + head == sum(p.numel() for p in model.parameters())

    model, _ = apply_strategy(model, compose_config(["strategy=freeze_lower", "strategy.frozen_blocks=1"]).strategy)
    report = parameter_report(model)
    assert report["trainable"] == 3 * block + norm + head
    assert report["trainable_blocks"] == [1, 2, 3]


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_covers_every_block_projection(arch):
    model, _ = apply_strategy(ARCHS[arch](), compose_config(["strategy=lora", "strategy.r=4"]).strategy)
    adapted = {name.split(".lora_A")[0] for name, _ in model.named_parameters() if ".lora_A." in name}
    linear_in_blocks = {
        name
        for name, m in model.named_modules()
        if ".h." in name or ".layers." in name
        if type(m).__name__ in ("Linear", "Conv1D") and "lora" not in name and "base_layer" not in name
    }
    assert {a.split("base_model.model.")[-1] for a in adapted} == {
        n.split("base_model.model.")[-1] for n in linear_in_blocks
    }


def test_an_architecture_without_a_block_list_is_named():
    class Odd(torch.nn.Module):
        config = Qwen2Config(model_type="qwen2")
        _no_split_modules = []

        def get_decoder(self):
            return self

    with pytest.raises(TransferError, match="cannot map the architecture Odd"):
        model_parts(Odd())


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "overrides,message",
    [
        (
            ["strategy=freeze_lower", "strategy.frozen_blocks=25"],
            "strategy.frozen_blocks=25: allowed an integer 0..24, or a fraction of the depth in (0, 1) (the model has 24 blocks)",
        ),
        (["strategy=freeze_lower", "strategy.frozen_blocks=-1"], "strategy.frozen_blocks=-1: allowed an integer 0..24"),
        (
            ["strategy=freeze_lower", "strategy.frozen_blocks=1.5"],
            "strategy.frozen_blocks=1.5: allowed an integer 0..24, or a fraction",
        ),
        (
            ["strategy=freeze_lower", "strategy.frozen_blocks=half"],
            "strategy.frozen_blocks='half': allowed an integer 0..24",
        ),
        (["strategy=adapter", "strategy.trained_blocks=0"], "strategy.trained_blocks=0: allowed an integer 1"),
        (
            ["strategy=adapter", "strategy.trained_blocks=30"],
            "strategy.trained_blocks=30: allowed an integer 1..24 (the model has 24 blocks)",
        ),
        (
            ["strategy=lora", "strategy.target_modules=[q_proj,qkv]"],
            "'qkv' matches no linear projection of Qwen2ForCausalLM; allowed: down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj",
        ),  # noqa: E501
        (["strategy=lora", "strategy.r=0"], "allowed r >= 1"),
        (["strategy=lora", "strategy.target_modules=[norm]"], "'norm' matches no linear projection"),
        (["strategy=ia3", "strategy.target_modules=[mlp]"], "'mlp' matches no linear projection"),
        (["strategy=lora", "strategy.modules_to_save=[lm_head]"], "'lm_head' is unknown; allowed: head, embeddings"),
    ],
)
def test_bad_strategy_values_are_named(overrides, message):
    with pytest.raises(TransferError) as e:
        apply_on_qwen2_shape(*overrides)
    assert message in str(e.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_qlora_without_cuda_is_refused_before_loading():
    with pytest.raises(TransferError, match="strategy=qlora needs a CUDA GPU .* use strategy=lora"):
        check_before_loading(compose_config(["strategy=qlora"]).strategy)


# ---------------------------------------------------------------- real models: only what is declared trains
STRATEGIES = [
    ["strategy=full"],
    ["strategy=freeze_embeddings"],
    ["strategy=freeze_lower", "strategy.frozen_blocks=2"],
    ["strategy=adapter", "strategy.trained_blocks=2"],
    ["strategy=adapter", "strategy.trained_blocks=1", "strategy.train_tied_embeddings=true"],
    ["strategy=lora", "strategy.r=4"],
    ["strategy=dora", "strategy.r=4"],
    ["strategy=ia3"],
    ["strategy=scratch"],
]


@pytest.mark.parametrize("model_dir", ["stories260k", "stories260k-qwen2"])
@pytest.mark.parametrize("strategy", STRATEGIES, ids=lambda s: "-".join(o.split("=")[1] for o in s))
def test_only_declared_parameters_change(shared, model_dir, strategy):
    cfg = compose_config([
        f"model.name_or_path={shared / 'models' / model_dir}", "model.tokenizer_from_json=true", *strategy,
        "max_steps=4", "micro_batch_size=4", "block_size=64", "eval_interval=0",
        "optimizer.lr=1e-3", "optimizer.warmup_ratio=0", "optimizer.weight_decay=0",
    ])  # fmt: skip
    model, tokenizer = load_model_and_tokenizer(cfg.model, cfg.block_size)
    model, declared = apply_strategy(model, cfg.strategy, seed=cfg.seed)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    objective = build_objective(cfg, tokenizer)
    result = train(model, objective, objective.prepare(None), cfg, resolve(cfg.hardware))
    assert result["steps"] == 4
    declared = set(declared)
    assert declared, "a strategy that trains nothing"
    for name, p in model.named_parameters():
        if name in declared:
            assert not torch.equal(p, before[name]), f"{name} is declared trainable but did not change"
        else:
            assert torch.equal(p, before[name]), f"{name} is frozen but changed"


# ---------------------------------------------------------------- the run record and dry runs
def test_dry_run_records_the_counts_and_stops(tmp_path):
    proc = run_cli(
        ["strategy=freeze_lower", "strategy.frozen_blocks=1", "dry_run=true", "hydra.run.dir=run",
         "hardware.memory_limit=0.02"], cwd=tmp_path
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert record["status"] == "dry_run"
    # the estimate comes before the weights, and a limit it exceeds is one warning line saying what would fit
    estimate = record["memory_estimate"]
    assert estimate["limit_bytes"] == int(0.02 * 2**30) < estimate["peak_bytes"]
    assert (
        estimate["advice"].startswith("the run's estimated peak") and "to fit: micro_batch_size=" in estimate["advice"]
    )
    assert f"WARNING] - {estimate['advice']}" in proc.stdout + proc.stderr
    p = record["params"]
    assert p["trainable_blocks"] == [1, 2, 3] and p["num_blocks"] == 4
    assert p["tied_embeddings"] is True and p["shared_matrix_trains"] is False
    assert p["breakdown"]["embeddings"] == 0 and sum(p["breakdown"].values()) == p["trainable"]
    assert "train" not in record and record["eval"] == {}
    assert not list((tmp_path / "run").glob("events.out.tfevents.*"))
    assert "parameters train" in proc.stdout + proc.stderr  # the one-line summary
    assert record["model"]["weights"] == "not loaded (dry run: shapes on the meta device)"


def test_dry_run_sweep_on_a_qwen2_0_5b_shaped_directory(tmp_path):
    """A dry run needs the config and the tokenizer, not the weights: Qwen2-0.5B's counts end to end in seconds.
    4 of its 24 blocks: every figure below is linear in the depth (test_qwen2_0_5b_counts checks the 24 blocks'),
    and the memory estimate traces each block, which 24 times over made this the suite's slowest test."""
    from transfer.models.load import byte_tokenizer

    layers = 4
    total = EMBED + layers * BLOCK + FINAL_NORM
    folder = tmp_path / "qwen2-0.5b-shape"
    qwen2_0_5b_shape(layers).config.save_pretrained(folder)  # config.json only: no weights on disk
    byte_tokenizer().save_pretrained(folder)
    args = ["-m", "strategy=full,freeze_lower,lora", "dry_run=true", f"model.name_or_path={folder}",
            "model.tokenizer_from_json=true", "hydra.sweep.dir=sweep"]  # fmt: skip
    run_ok(args, tmp_path)
    records = {
        r["choices"]["strategy"]: r for r in map(json.loads, map(Path.read_text, tmp_path.glob("sweep/*/metrics.json")))
    }
    assert {k: (r["status"], r["params"]["trainable"], r["params"]["total"]) for k, r in records.items()} == {
        "full": ("dry_run", total, total),
        "freeze_lower": ("dry_run", layers // 2 * BLOCK + FINAL_NORM, total),
        "lora": ("dry_run", layers * LORA_BLOCK, total + layers * LORA_BLOCK),
    }
    assert records["lora"]["params"]["tied_embeddings"] is True
    # the memory estimate, in the same seconds: fp32 weights with the tied head once, and AdamW's state
    # (two moments a trained number, a 4-byte step count a trained tensor) exactly
    for name, r in records.items():
        estimate = r["memory_estimate"]["training"]
        assert estimate["weights"] == 4 * r["params"]["total"] + 2 * 4 * 32  # and rotary's two inv_freq buffers
        tensors = {"full": 2 + layers * 12, "freeze_lower": 1 + layers // 2 * 12, "lora": layers * 7 * 2}[name]
        assert estimate["optimizer"] == 8 * r["params"]["trainable"] + 4 * tensors
    # the sweep's comparison table shows the counts, and no empty perplexity columns
    table = pd.read_csv(tmp_path / "sweep" / "tables" / "comparison.csv")
    assert dict(zip(table["strategy"], table["trainable_params"], strict=True)) == {
        k: r["params"]["trainable"] for k, r in records.items()
    }
    assert set(table["status"]) == {"dry_run"} and set(table["seeds"]) == {1}
    assert dict(zip(table["strategy"], table["estimated_peak_mb"], strict=True)) == pytest.approx(
        {k: r["memory_estimate"]["peak_bytes"] / 2**20 for k, r in records.items()}, rel=1e-3
    )
    header = (tmp_path / "sweep" / "tables" / "comparison.md").read_text().splitlines()[0]
    assert "total_params" in header and "ppl" not in header


def test_sweep_of_every_cpu_strategy_on_tiny(tmp_path):
    names = ["full", "freeze_lower", "freeze_embeddings", "adapter", "lora", "dora", "ia3", "scratch"]
    args = [
        "-m",
        f"strategy={','.join(names)}",
        "max_steps=8",
        "eval_interval=0",
        "block_size=64",
        "micro_batch_size=4",
        "eval.max_tokens=2048",
        "eval.probes.python_docs.max_tokens=2048",
        "eval.max_new_tokens=4",
        "checkpoint.enabled=false",
        "hardware.estimate_memory=false",
    ]
    proc = run_cli(args, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    assert "job 1 of 8: strategy=full" in output and "job 8 of 8: strategy=scratch" in output
    assert "left at" in output.split("job 2 of 8")[1].splitlines()[0]  # the time left, from the jobs done
    # the project's own lines: no warning or error of its own on a sweep of defaults (what libraries log is theirs,
    # and changes with their versions), and each job's summary with the counts derived by hand
    own = [line for line in output.splitlines() if line.startswith("[") and "][transfer" in line.split(" - ")[0]]
    busy = "the machine is busy"  # of the machine, not of the sweep: a loaded runner says so (hardware.warn_if_busy)
    assert [line for line in own if ("][WARNING]" in line or "][ERROR]" in line) and busy not in line] == []
    assert "\r" not in output  # no progress bars in a log: plain lines
    tiny = compose_config([]).model.tiny
    counts = qwen2_counts(tiny.hidden_size, tiny.num_layers, tiny.hidden_size // tiny.num_heads * tiny.num_kv_heads,
                          tiny.intermediate_size, 320)  # fmt: skip
    assert counts["full"] == (829_568, 829_568)  # the shipped tiny model: 257 byte-level tokens, 320 rows embedded
    for number, name in enumerate(names, 1):
        job = output.split(f"job {number} of 8: strategy={name}")[1].split(f"job {number + 1} of 8")[0]
        trainable, total = counts[name]
        assert f"{trainable:,} of {total:,} parameters train" in job, name
    records = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("multirun/*/*/*/metrics.json"))]
    assert [
        r["choices"]["strategy"] for r in sorted(records, key=lambda r: names.index(r["choices"]["strategy"]))
    ] == names
    for r in records:
        assert r["status"] == "completed", r["error"]
        p = r["params"]
        assert (p["trainable"], p["total"]) == counts[r["choices"]["strategy"]], r["choices"]["strategy"]
        assert sum(p["breakdown"].values()) == p["trainable"] and p["num_blocks"] == tiny.num_layers


# ---------------------------------------------------------------- a peft strategy added through the seam
def test_loha_trains_peft_s_own_count_its_update_is_read_and_it_merges_on_export(tmp_path):
    """strategy=loha, three steps on the random tiny model: counts, diagnostics and export as its row says."""
    from peft import LoHaConfig, get_peft_model

    from transfer.export import main, pick_weights, read_run, rebuild, run_config
    from transfer.run import run_experiment

    overrides = ["strategy=loha", "model=tiny_random", "max_steps=3", "eval_interval=0", "block_size=32",
                 "micro_batch_size=2", "eval.max_tokens=256", "eval/probes=[]", "eval.max_new_tokens=2",
                 "hardware.estimate_memory=false", "optimizer.lr=1e-2"]  # fmt: skip
    cfg = compose_config(overrides)
    record = run_experiment(cfg, tmp_path / "run", choices={}, overrides=overrides)
    assert record["status"] == "completed", record.get("error")
    plain, _ = load_model_and_tokenizer(cfg.model, cfg.block_size)
    peft_count, _ = get_peft_model(
        plain, LoHaConfig(r=8, alpha=16, target_modules="all-linear")
    ).get_nb_trainable_parameters()
    assert record["params"]["trainable"] == record["params"]["breakdown"]["peft"] == peft_count
    blocks = record["diagnostics"]["weight_change"]["blocks"]
    assert len(blocks) == record["params"]["num_blocks"] and all(v > 0 for v in blocks)  # read, as peft merges it
    assert main([str(tmp_path / "run"), "--merge", "--out", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    run = tmp_path / "run"
    tuned, _ = rebuild(run_config(read_run(run), run), pick_weights(read_run(run), run, None))
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, tuned(ids).logits, atol=1e-5, rtol=0)

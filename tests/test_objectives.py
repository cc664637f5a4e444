"""Objectives: masks, templates, exact normalisation, packing, choice scoring, and a real SFT run resumed exactly."""

import json
import math
import random
from pathlib import Path

import pytest
import torch
from conftest import run_here

from transfer.config.compose import compose_config
from transfer.data.chat import Example, encode, fit, render, template_of, to_example, training_tokens
from transfer.data.sequences import IGNORE, ExampleStream, Sequences, packed_batch, padded_batch
from transfer.errors import TransferError
from transfer.evaluation.choices import choice_metrics, choice_scores, roc_auc
from transfer.models.load import byte_tokenizer, load_model_and_tokenizer
from transfer.objectives import build_objective
from transfer.train import train
from transfer.training.hardware import resolve
from transfer.training.loss import summed_lm_loss

INSTRUCTIONS = Path(__file__).parent / "data" / "instructions.jsonl"
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TURNS = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Bye"},
    {"role": "assistant", "content": "Ciao"},
]


def chatml_tokenizer():
    """A tokenizer with a real chat template (ChatML, as Qwen's), built offline from the byte tokenizer."""
    tok = byte_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    return tok


def trained_text(tokenizer, ids, labels) -> str:
    return tokenizer.decode([t for t, label in zip(ids, labels, strict=True) if label != IGNORE])


# ---------------------------------------------------------------- masks and templates
@pytest.mark.parametrize("template", ["plain", "chat"])
def test_the_loss_counts_every_assistant_turn_and_its_end_and_nothing_else(template):
    tok = chatml_tokenizer() if template == "chat" else byte_tokenizer()
    assert template_of(tok, "auto") == template
    ids, labels = training_tokens(Example(TURNS), tok, template, train_on_prompt=False)
    end = "<|im_end|>" if template == "chat" else tok.eos_token
    assert trained_text(tok, ids, labels) == f"Hello!{end}Ciao{end}"
    text, spans = render(Example(TURNS), tok, template)
    assert [text[a:b] for a, b, _ in spans] == ["Hello!", "Ciao"]
    assert tok.decode(ids) == text  # the tokens are the text's, nothing added or lost
    everything = training_tokens(Example(TURNS), tok, template, train_on_prompt=True)[1]
    assert all(label != IGNORE for label in everything)


def test_the_chat_template_frames_the_conversation_as_the_tokenizer_says():
    tok = chatml_tokenizer()
    text, _ = render(Example(TURNS), tok, "chat")
    assert text == tok.apply_chat_template(TURNS, tokenize=False)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there")
    ids, labels = training_tokens(Example(TURNS), tok, "chat", False)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert [label for label in labels if label == im_end] == [im_end, im_end]  # the assistant turns' ends only
    assert ids.count(im_end) == 5  # one after every message


@pytest.mark.parametrize(
    "row,fmt,expected",
    [
        ({"instruction": "Add.", "input": "1 and 2", "output": "3"}, "alpaca", ("Add.\n\n1 and 2", "3")),
        ({"instruction": "Add.", "input": "", "output": "3"}, "alpaca", ("Add.", "3")),
        ({"prompt": "Q?", "completion": "A."}, "prompt_completion", ("Q?", "A.")),
        (
            {"conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A."}]},
            "messages",
            ("Q?", "A."),
        ),
        (
            {"messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}]},
            "messages",
            ("Q?", "A."),
        ),
    ],
    ids=["alpaca", "alpaca-no-input", "prompt-completion", "sharegpt", "messages"],
)
def test_formats_become_conversations(row, fmt, expected):
    from transfer.data.chat import detect_format

    cfg = compose_config(["dataset=text_files", f"dataset.train_files=[{INSTRUCTIONS}]"]).dataset
    assert detect_format(row, cfg, "row") == fmt
    example = to_example(row, fmt, cfg, "row")
    assert (example.messages[-2]["content"], example.answer) == expected


def test_template_none_keeps_prompt_and_completion_as_written():
    tok = byte_tokenizer()
    example = Example([{"role": "user", "content": "2+2="}, {"role": "assistant", "content": "4"}], raw=("2+2=", "4"))
    text, spans = render(example, tok, "none")
    assert text == "2+2=4" + tok.eos_token
    ids, labels = encode(text, [(a, c) for a, _, c in spans], tok, "none")
    assert trained_text(tok, ids, labels) == "4" + tok.eos_token


def test_a_conversation_that_does_not_end_with_an_answer_is_named():
    cfg = compose_config(["dataset=text_files", f"dataset.train_files=[{INSTRUCTIONS}]"]).dataset
    with pytest.raises(TransferError, match="row 7: the conversation does not end with the assistant's answer"):
        to_example({"messages": [{"role": "user", "content": "Q?"}]}, "messages", cfg, "row 7")


def test_too_long_cuts_the_prompt_start_first_then_the_answer_end():
    ids = list(range(10))
    labels = [IGNORE] * 6 + [6, 7, 8, 9]  # a 6-token prompt, a 4-token answer
    assert fit(ids, labels, 12) == (ids, labels, None)
    cut_ids, cut_labels, what = fit(ids, labels, 7)  # the prompt loses its start; one token of it stays as context
    assert what == "prompt" and cut_ids == [3, 4, 5, 6, 7, 8, 9] and cut_labels[-4:] == [6, 7, 8, 9]
    cut_ids, cut_labels, what = fit(ids, labels, 3)  # then the answer loses its end
    assert what == "response" and cut_ids == [5, 6, 7] and cut_labels == [IGNORE, 6, 7]


# ---------------------------------------------------------------- batching
def test_packed_rows_never_attend_across_examples():
    model, _ = load_model_and_tokenizer(compose_config([]).model, 64)
    model.eval()
    g = torch.Generator().manual_seed(0)
    seqs_ids = [torch.randint(0, 257, (n,), generator=g).tolist() for n in (5, 9, 7)]
    seqs = Sequences.from_lists(seqs_ids, seqs_ids)
    stream = ExampleStream(seqs.lengths(), seed=0)
    order = [seqs_ids[i] for i in ExampleStream(seqs.lengths(), seed=0)._order_of(0)]  # the row's layout
    batch = packed_batch(seqs, stream, rows=1, row_length=24, pad_id=0)
    assert batch.examples == 3 and batch.tokens == 21 and stream.position == 3
    assert batch.position_ids[0].tolist() == [*range(len(order[0])), *range(len(order[1])), *range(len(order[2])),
                                              0, 1, 2]  # fmt: skip
    with torch.no_grad():
        packed = model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).logits[0]
        start = 0
        for ids in order:
            alone = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
            torch.testing.assert_close(packed[start : start + len(ids)], alone, rtol=1e-5, atol=1e-5)
            start += len(ids)
        # the packed row's loss is the sum of the examples' own: no target crosses from one to the next
        total, count = summed_lm_loss(model, batch.input_ids, batch.labels, position_ids=batch.position_ids)
        parts = [summed_lm_loss(model, torch.tensor([ids]), torch.tensor([ids])) for ids in order]
    assert count == batch.normaliser == sum(n for _, n in parts) == 21 - 3
    torch.testing.assert_close(total, sum(t for t, _ in parts), rtol=1e-5, atol=1e-5)


def test_padded_batches_score_only_real_answer_tokens():
    seqs = Sequences.from_lists([[1, 2, 3], [4, 5]], [[IGNORE, 2, 3], [IGNORE, 5]])
    batch = padded_batch(seqs, [0, 1], pad_id=0)
    assert batch.input_ids.tolist() == [[1, 2, 3], [4, 5, 0]]
    assert batch.labels.tolist() == [[IGNORE, 2, 3], [IGNORE, 5, IGNORE]]
    assert (batch.normaliser, batch.tokens, batch.positions) == (3, 5, 6)


@pytest.mark.parametrize("batching,splits", [("padded", ((8, 1), (2, 4))), ("packed", ((2, 1), (1, 2)))])
def test_one_step_is_the_same_update_for_8x1_and_2x4_micro_batches(batching, splits):
    """Examples of different lengths, masked: the step's loss and gradients do not depend on the split
    (packed: 2 rows in one micro-batch, or one row in each of two)."""
    updates, losses = [], []
    for micro, accum in splits:
        cfg = compose_config([
            "objective=sft", "dataset=text_files", f"dataset.train_files=[{INSTRUCTIONS}]", "dataset.holdout_fraction=0.1",
            f"objective.batching={batching}", f"micro_batch_size={micro}",
            f"grad_accum_steps={accum}", "max_steps=1", "eval_interval=0", "block_size=128", "optimizer=sgd",
            "optimizer.lr=1.0", "optimizer.momentum=0", "optimizer.grad_clip=null", "optimizer.warmup_ratio=0",
            "checkpoint.enabled=false",
        ])  # fmt: skip
        model, tokenizer = load_model_and_tokenizer(cfg.model, cfg.block_size)
        before = [p.detach().clone() for p in model.parameters()]
        objective = build_objective(cfg, tokenizer)
        splits = objective.prepare(None)
        lengths = splits["train"].lengths().tolist()
        assert len(set(lengths)) > 3  # examples of different lengths
        result = train(model, objective, splits, cfg, resolve(cfg.hardware))
        updates.append([p.detach() - b for p, b in zip(model.parameters(), before, strict=True)])
        losses.append((result["loss_first"], result["scored_tokens"], result["samples"]))
    assert losses[0][1:] == losses[1][1:]  # the same examples and targets
    assert losses[0][0] == pytest.approx(losses[1][0], rel=1e-6)
    for a, b in zip(*updates, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- choice scoring and its metrics
def test_choice_scores_are_the_summed_log_probabilities_of_each_answer():
    model, tok = load_model_and_tokenizer(compose_config([]).model, 64)
    model.eval()
    example = Example([{"role": "user", "content": "Is 4 even?"}, {"role": "assistant", "content": "Yes"}])
    seqs = Sequences.from_lists(*zip(*[_answer(example, c, tok) for c in ("Yes", "No")], strict=True))
    scores = choice_scores(model, seqs, 2, batch_size=2, hardware=resolve(compose_config([]).hardware), pad_id=0)
    prompt = "### Instruction:\nIs 4 even?\n\n### Response:\n"  # the plain template, by hand
    for j, choice in enumerate(("Yes", "No")):
        ids = torch.tensor([tok(prompt + choice)["input_ids"]])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
        n = len(tok(choice)["input_ids"])
        by_hand = sum(logp[t - 1, ids[0, t]] for t in range(ids.shape[1] - n, ids.shape[1]))
        assert scores[0, j].item() == pytest.approx(by_hand.item(), rel=1e-5)


def _answer(example, choice, tok):
    from transfer.data.chat import answer_tokens

    return answer_tokens(example, choice, tok, "plain")


def test_roc_auc_is_the_share_of_positive_negative_pairs_ranked_right():
    g = torch.Generator().manual_seed(1)
    for n in (7, 50, 200):
        scores = torch.randint(0, 6, (n,), generator=g).double()  # many ties
        positive = torch.rand(n, generator=g) < 0.4
        pos, neg = scores[positive], scores[~positive]
        pairwise = ((pos[:, None] > neg[None, :]).double() + 0.5 * (pos[:, None] == neg[None, :]).double()).mean()
        assert roc_auc(scores, positive) == pytest.approx(pairwise.item(), abs=1e-12)
    assert roc_auc(torch.tensor([0.1, 0.9]), torch.tensor([True, True])) is None  # one class: undefined


def test_choice_metrics_by_hand():
    scores = torch.log(torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]]))
    gold = torch.tensor([0, 1, 1, 0])  # right, right, wrong, wrong
    m = choice_metrics(scores, gold)
    assert m["accuracy"] == 0.5
    assert m["log_loss"] == pytest.approx(-(math.log(0.9) + math.log(0.8) + math.log(0.4) + math.log(0.3)) / 4)
    # positives (gold "Yes", index 0) scored 0.9 and 0.3; negatives 0.2 and 0.6: 3 of the 4 pairs ranked right
    assert m["auc"] == pytest.approx(0.75)


def test_choice_metrics_move_when_the_choices_are_swapped():
    """Three of four right, and every positive above every negative; the same scores with the two choices swapped are
    one of four right and every pair ranked wrong: a scorer or a gold index that mixes up the choices cannot pass."""
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.7, 0.3]], dtype=torch.float64)
    gold = torch.tensor([0, 1, 1, 0])
    right = choice_metrics(probs.log(), gold)
    assert (right["accuracy"], right["auc"], right["choice_examples"]) == (0.75, 1.0, 4)
    assert right["log_loss"] == pytest.approx(-(math.log(0.9) + math.log(0.8) + math.log(0.4) + math.log(0.7)) / 4)
    swapped = choice_metrics(probs.flip(1).log(), gold)
    assert (swapped["accuracy"], swapped["auc"]) == (0.25, 0.0)
    assert swapped["log_loss"] == pytest.approx(-(math.log(0.1) + math.log(0.2) + math.log(0.6) + math.log(0.3)) / 4)
    # log-likelihoods, not probabilities: a constant added to an example's scores changes nothing
    shifted = choice_metrics(probs.log() - torch.tensor([[3.0], [0.5], [7.0], [1.0]], dtype=torch.float64), gold)
    spread = ("constant_accuracy", "predicted_share")  # {choice: share}: equal, not approximately
    assert {k: v for k, v in shifted.items() if k not in spread} == pytest.approx(
        {k: v for k, v in right.items() if k not in spread}
    )
    assert [shifted[k] for k in spread] == [right[k] for k in spread]


def test_what_a_constant_answer_scores_and_how_the_answers_spread():
    """Three of four gold answers "Yes": always "Yes" scores 0.75, always "No" 0.25, the majority 0.75, exactly,
    before and after whatever the model does. A real model made to answer "No" to everything (its head zeroed: every
    token equally likely, so the shorter answer's two tokens beat "Yes"'s three) puts all its answers on "No" and
    scores that choice's gold share, however well or badly it would rank the examples."""
    gold = torch.tensor([0, 0, 1, 0])
    scores = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.7, 0.3]], dtype=torch.float64).log()
    m = choice_metrics(scores, gold, ["Yes", "No"])
    assert m["constant_accuracy"] == {"Yes": 0.75, "No": 0.25} and m["majority_accuracy"] == 0.75
    assert m["predicted_share"] == {"Yes": 0.75, "No": 0.25} and m["max_predicted_share"] == 0.75
    assert choice_metrics(scores, gold)["constant_accuracy"] == {"0": 0.75, "1": 0.25}  # unnamed: by index

    model, tok = load_model_and_tokenizer(compose_config([]).model, 64)
    with torch.no_grad():
        model.get_output_embeddings().weight.zero_()
    model.eval()
    examples = [Example([{"role": "user", "content": f"Is {k} even?"}, {"role": "assistant", "content": a}])
                for k, a in ((4, "Yes"), (6, "Yes"), (7, "No"), (8, "Yes"))]  # fmt: skip
    seqs = Sequences.from_lists(*zip(*[_answer(e, c, tok) for e in examples for c in ("Yes", "No")], strict=True))
    hardware = resolve(compose_config([]).hardware)
    scores = choice_scores(model, seqs, 2, batch_size=4, hardware=hardware, pad_id=0)
    constant = choice_metrics(scores, gold, ["Yes", "No"])
    assert constant["predicted_share"] == {"Yes": 0.0, "No": 1.0} and constant["max_predicted_share"] == 1.0
    assert constant["accuracy"] == constant["constant_accuracy"]["No"] == 0.25
    assert constant["constant_accuracy"] == m["constant_accuracy"]  # the gold shares are the data's, not the model's


# ---------------------------------------------------------------- a real run, killed and resumed
def parity_task(folder: Path) -> list[str]:
    """A Yes/No task written for the tests: is the number even? Train, validation and test files."""
    rng = random.Random(0)
    for split, n in (("train", 240), ("validation", 40), ("test", 40)):
        rows = []
        for _ in range(n):
            k = rng.randrange(10, 1000)
            rows.append({"prompt": f"Is {k} an even number?", "completion": "Yes" if k % 2 == 0 else "No"})
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return ["objective=sft", "dataset=text_files", "dataset.format=prompt_completion", "dataset.choices=[Yes,No]",
            *(f"dataset.{s}_files=[{folder / f'{s}.jsonl'}]" for s in ("train", "validation", "test")),
            "eval/probes=[]", "block_size=64", "micro_batch_size=8", "max_steps=40", "eval_interval=20",
            "checkpoint.interval=10", "log_interval=1", "optimizer.lr=1e-3", "eval.max_new_tokens=4",
            "objective.select=auc", "hardware.estimate_memory=false"]  # fmt: skip


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("sft")
    args = parity_task(root)
    run_here(args, root / "run")
    return root, args


def test_an_sft_run_records_answers_choices_and_samples(sft_run):
    root, _ = sft_run
    r = json.loads((root / "run" / "metrics.json").read_text())
    assert r["status"] == "completed" and r["record_version"] == 3
    assert r["objective"] == {"name": "sft", "select": "auc", "mode": "max", "template": "plain", "train_on_prompt": False,
                              "truncation": "truncate", "batching": "padded", "choices": ["Yes", "No"],
                              "choices_scored": ["Yes", "No"]}  # fmt: skip
    train = r["train"]
    # the answers alone are scored: "Yes" or "No" and the end-of-text token, 3 or 4 bytes of the byte tokenizer
    assert train["scored_tokens"] < 0.2 * train["tokens"] and train["samples"] == 40 * 8
    for when in ("baseline", "final"):
        v = r["eval"][when]["validation"]
        assert v["choice_examples"] == 40 and 0 <= v["accuracy"] <= 1 and 0 <= v["auc"] <= 1 and v["log_loss"] > 0
    assert r["eval"]["final"]["validation"]["loss"] < r["eval"]["baseline"]["validation"]["loss"]
    curve = train["validation_curve"]
    assert [v["step"] for v in curve] == [20, 40] and all("auc" in v for v in curve)
    best = max([(r["eval"]["baseline"]["validation"]["auc"], 0)] + [(v["auc"], v["step"]) for v in curve])
    assert train["best_step"] == best[1] and train["select"] == "auc"  # the best weights by AUC
    assert [s["reference"] for s in r["samples"]] and r["samples_from"] == "the first validation examples"
    assert r["eval"]["change"]["validation"]["auc"] == pytest.approx(
        r["eval"]["final"]["validation"]["auc"] - r["eval"]["baseline"]["validation"]["auc"]
    )
    # what a constant answer scores: the gold shares of the split's file, before and after alike; the answers' spread
    for split, short in (("validation", "validation"), ("test", "test")):
        answers = [json.loads(line)["completion"] for line in (root / f"{short}.jsonl").read_text().splitlines()]
        shares = {c: answers.count(c) / len(answers) for c in ("Yes", "No")}
        for when in ("baseline", "final"):
            v = r["eval"][when][split]
            assert v["constant_accuracy"] == shares and v["majority_accuracy"] == max(shares.values())
            assert sum(v["predicted_share"].values()) == pytest.approx(1) and set(v["predicted_share"]) == {"Yes", "No"}
            assert v["max_predicted_share"] == max(v["predicted_share"].values())
        # descriptive, not better or worse: no change recorded for them
        assert not {"constant_accuracy", "majority_accuracy", "max_predicted_share"} & set(r["eval"]["change"][split])


def test_the_recorded_task_metrics_are_the_final_models_own(sft_run, tmp_path):
    """The record's validation accuracy, log-loss and AUC, recomputed from the exported model by transformers alone:
    each validation prompt in the plain template, "Yes" and "No" scored by their summed log-probabilities."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from transfer.export import main

    root, _ = sft_run
    record = json.loads((root / "run" / "metrics.json").read_text())
    assert main([str(root / "run"), "--out", str(tmp_path / "model")]) == 0  # the weights of the final evaluation
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "model")
    rows = [json.loads(line) for line in (root / "validation.jsonl").read_text().splitlines()]
    sums = torch.zeros(len(rows), 2, dtype=torch.float64)
    with torch.no_grad():
        for i, row in enumerate(rows):
            prompt = tok(f"### Instruction:\n{row['prompt']}\n\n### Response:\n")["input_ids"]
            for j, choice in enumerate(("Yes", "No")):
                ids = torch.tensor([prompt + tok(choice)["input_ids"]])
                logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
                sums[i, j] = logp[torch.arange(len(prompt) - 1, ids.shape[1] - 1), ids[0, len(prompt) :]].sum()
    gold = torch.tensor([0 if row["completion"] == "Yes" else 1 for row in rows])
    p_yes = torch.softmax(sums, -1)[:, 0]
    pos, neg = p_yes[gold == 0], p_yes[gold == 1]
    auc = ((pos[:, None] > neg[None, :]).double() + 0.5 * (pos[:, None] == neg[None, :]).double()).mean().item()
    log_loss = -torch.log_softmax(sums, -1)[torch.arange(len(rows)), gold].mean().item()
    recorded = record["eval"]["final"]["validation"]
    assert recorded["choice_examples"] == len(rows) == 40
    assert recorded["accuracy"] == (sums.argmax(-1) == gold).double().mean().item()
    assert recorded["auc"] == pytest.approx(auc, abs=1e-12)
    assert recorded["log_loss"] == pytest.approx(log_loss, rel=1e-5)


def test_the_tables_read_the_task_metrics_from_the_record(sft_run, tmp_path):
    from transfer.aggregate.columns import lower_is_better
    from transfer.aggregate.output import aggregate

    root, _ = sft_run
    sweep = tmp_path / "sweep"
    (sweep / "0").mkdir(parents=True)
    for name in ("metrics.json",):
        (sweep / "0" / name).write_bytes((root / "run" / name).read_bytes())
    jobs, table, files = aggregate([sweep], sort="val_auc_after")
    r = json.loads((root / "run" / "metrics.json").read_text())
    for column, (when, metric) in {"val_auc_after": ("final", "auc"), "val_accuracy_before": ("baseline", "accuracy"),
                                   "test_log_loss_after": ("final", "log_loss"), "val_ppl_after": ("final", "perplexity")}.items():  # fmt: skip
        split = {"val": "validation", "test": "test"}[column.split("_")[0]]
        assert table.at[0, column] == r["eval"][when][split][metric]
    assert not lower_is_better("val_auc_after") and lower_is_better("val_log_loss_after")
    assert (sweep / "tables" / "task_metrics.png").read_bytes()[:4] == b"\x89PNG"
    shown = (sweep / "tables" / "comparison.md").read_text()
    assert "val_auc_after" in shown.splitlines()[0]
    # accuracy beside what the majority class scores and the largest share of one answer, both splits, and what
    # they mean under the table
    header = [c.strip() for c in shown.splitlines()[0].strip("|").split("|")]
    for split in ("val", "test"):
        trio = [f"{split}_accuracy_after", f"{split}_majority_accuracy_after", f"{split}_max_predicted_share_after"]
        assert header[header.index(trio[0]) : header.index(trio[0]) + 3] == trio
        for col in trio[1:]:
            metric = col.removeprefix(f"{split}_").removesuffix("_after")
            assert table.at[0, col] == r["eval"]["final"]["validation" if split == "val" else "test"][metric]
    assert "`majority_accuracy` is the accuracy of always giving the split's most frequent answer" in shown
    assert not [c for c in jobs.columns if "predicted_share_" in c.replace("max_predicted_share", "")]  # dicts stay out


def test_every_objective_option_runs_as_a_class_with_every_member_the_protocol_lists():
    """conf/objective/*.yaml and config/objective.py's rows name the same objectives; the class each row names
    (`runs_as`) provides every member of objectives.base.Objective: what the loop, the run and evaluation ask."""
    from transfer.config.objective import OBJECTIVES
    from transfer.objectives import base, objective_class

    options = {p.stem for p in (Path(__file__).resolve().parents[1] / "conf" / "objective").glob("*.yaml")}
    assert options == set(OBJECTIVES) and len(options) == 8
    members = {n for n in vars(base.Objective) if not n.startswith("_")} | set(base.Objective.__annotations__)
    assert {"loss", "batch", "begin_step", "evaluate", "attach", "pad_id", "metrics"} <= members and len(members) == 23
    for name in sorted(OBJECTIVES):
        objective = build_objective(compose_config([f"objective={name}"]), byte_tokenizer())
        assert type(objective) is objective_class(name) and objective.name == name
        assert [m for m in sorted(members) if not hasattr(objective, m)] == [], name

"""`python -m transfer.preview OVERRIDES`: the marks it prints are the objective's own label masks, token for token,
and its truncation counts and lengths are those of the data cut to block_size, computed here on their own."""

import json
import re
import statistics
from pathlib import Path

import pytest
from test_chat import INSTRUCTIONS, chat_model

from transfer.config.compose import compose_config
from transfer.data.sequences import IGNORE
from transfer.fmt import count
from transfer.models.load import load_model_and_tokenizer
from transfer.objectives import build_objective
from transfer.preview import ANSI, main

PAIRS = Path(__file__).parent / "data" / "pairs.jsonl"
# every file is every split: the training split is the file's rows in order, none carved out for validation
WHOLE = ["dataset=text_files", *(f"dataset.{s}_files=[{INSTRUCTIONS}]" for s in ("train", "validation", "test"))]


def preview(argv: list[str], capsys) -> str:
    assert main(argv) == 0
    return capsys.readouterr().out


def examples(out: str) -> dict[str, str]:
    """Each shown example's text by its title ("train #1", "train #1 chosen"), from the preview's output."""
    shown = out.split("\n\ntrain: ")[0]  # the examples end where the counts begin
    parts = re.split(r"(?m)^── (.+?) · .*\n", shown)
    titles, texts = parts[1::2], parts[2::2]
    return {
        t: text.removesuffix("\n") if i < len(texts) - 1 else text
        for i, (t, text) in enumerate(zip(titles, texts, strict=True))
    }


def marks(text: str, colour: bool = False) -> list[tuple[str, bool]]:
    """(character, whether it is marked scored) for every character of a shown example."""
    opening, closing = (ANSI["scored"], ANSI["end"]) if colour else ("[[", "]]")
    if colour:  # a masked run is dim: its opening goes, its end closes nothing
        text = text.replace(ANSI["masked"], "")
    chars, scored, i = [], False, 0
    while i < len(text):
        if text.startswith(opening, i) and not scored:
            scored, i = True, i + len(opening)
        elif text.startswith(closing, i):
            scored, i = False, i + len(closing)
        else:
            chars.append((text[i], scored))
            i += 1
    return chars


def assert_marks_are_labels(text: str, ids: list[int], labels: list[int], tokenizer, colour: bool = False) -> None:
    """Walk the tokens along the shown text: each token's characters are there, marked exactly where it is scored."""
    chars, at = marks(text, colour), 0
    for token, label in zip(ids, labels, strict=True):
        piece = tokenizer.decode([token])
        assert "".join(c for c, _ in chars[at : at + len(piece)]) == piece
        assert {s for _, s in chars[at : at + len(piece)]} == {label != IGNORE}, (piece, label)
        at += len(piece)
    assert at == len(chars)


def scored_runs(text: str, colour: bool = False) -> list[str]:
    runs, current = [], None
    for c, scored in marks(text, colour):
        if scored:
            current = (current or "") + c
        elif current is not None:
            runs.append(current)
            current = None
    return runs + ([current] if current is not None else [])


def objective_split(overrides: list[str], name: str = "train"):
    cfg = compose_config(overrides)
    _, tokenizer = load_model_and_tokenizer(cfg.model, cfg.block_size, weights=False)
    return tokenizer, build_objective(cfg, tokenizer).prepare(cfg.eval.max_tokens)[name]


def test_the_marks_are_the_sft_objectives_label_masks_on_a_chat_dataset(tmp_path, capsys):
    overrides = [
        "model=local",
        f"model.name_or_path={chat_model(tmp_path / 'model')}",
        "objective=sft",
        "block_size=256",
        *WHOLE,
    ]
    out = preview(["--n", "3", "--colour", "never", *overrides], capsys)
    assert "template=chat" in out.splitlines()[0]
    shown = examples(out)
    assert list(shown) == ["train #1", "train #2", "train #3"]
    tokenizer, split = objective_split(overrides)
    rows = [json.loads(line) for line in INSTRUCTIONS.read_text().splitlines()]
    for i, text in enumerate(shown.values()):
        ids, labels = (t.tolist() for t in split.get(i))
        assert_marks_are_labels(text, ids, labels, tokenizer)
        # what the loss should count, from the file: the answer and the token that ends its turn, nothing else
        assert scored_runs(text) == [rows[i]["output"] + "<|im_end|>"]
        assert text.startswith("<|im_start|>user\n" + rows[i]["instruction"])


def test_the_marks_are_a_preference_objectives_masks_for_chosen_and_rejected(capsys):
    overrides = ["objective=dpo", "dataset=text_files", f"dataset.train_files=[{PAIRS}]"]
    out = preview(["--n", "2", "--colour", "always", *overrides], capsys)
    assert "[[" not in out
    shown = examples(out)
    assert list(shown) == ["train #1 chosen", "train #1 rejected", "train #2 chosen", "train #2 rejected"]
    tokenizer, split = objective_split(overrides)
    for number in (0, 1):
        for side, answer in ((0, " Yes."), (1, " No.")):
            text = shown[f"train #{number + 1} {('chosen', 'rejected')[side]}"]
            ids, labels = (t.tolist() for t in split.get(int(split.pairs[number, side])))
            assert_marks_are_labels(text, ids, labels, tokenizer, colour=True)
            assert scored_runs(text, colour=True) == [answer + "<|endoftext|>"]
    assert f"train: {len(split.pairs)} rows read -> {len(split.pairs)} pairs, {len(split)} sequences" in out


def plain_lengths(block_size: int) -> tuple[list[int], int, int]:
    """Each instruction's tokens under the plain template with the byte tokenizer (a byte a token, <eos> one), and
    how data/chat.py cuts those over block_size: (whole lengths, prompts cut, answers cut), computed from the file."""
    totals, prompt, response = [], 0, 0
    for line in INSTRUCTIONS.read_text().splitlines():
        row = json.loads(line)
        user = row["instruction"] + (f"\n\n{row['input']}" if row["input"] else "")
        before = len(f"### Instruction:\n{user}\n\n### Response:\n".encode())
        total = before + len(row["output"].encode()) + 1 + 2  # the answer, <eos>, "\n\n"
        if total > block_size:
            # the prompt's start goes first, keeping one token before the answer; then the answer's end
            if total - min(total - block_size, before - 1) <= block_size:
                prompt += 1
            else:
                response += 1
        totals.append(total)
    return totals, prompt, response


@pytest.mark.parametrize("truncation", ["truncate", "drop"])
def test_truncation_counts_and_lengths_are_those_of_the_data_cut_to_block_size(truncation, capsys):
    block = 64
    totals, prompt, response = plain_lengths(block)
    too_long = sum(total > block for total in totals)
    assert 0 < prompt and 0 < response and too_long < len(totals)  # this block_size cuts both ways, not all
    out = preview(["--n", "0", f"block_size={block}", "objective=sft", f"objective.truncation={truncation}", *WHOLE],
                  capsys)  # fmt: skip
    lines = out.splitlines()
    at = lines.index(next(line for line in lines if line.startswith("train: ")))
    if truncation == "drop":
        lengths, dropped, prompt, response = [t for t in totals if t <= block], too_long, 0, 0
    else:
        lengths, dropped = [min(t, block) for t in totals], 0
    kept = len(lengths)
    assert lines[at].startswith(f"train: 12 rows read -> {count(kept, 'sequence')}, {sum(lengths):,} tokens")
    assert lines[at + 1] == (
        f"  truncated {prompt + response} (prompt {prompt}, response {response}); dropped {dropped} "
        f"(too long {dropped}, no answer left 0)"
    )
    p95 = sorted(lengths)[-(-95 * kept // 100) - 1]  # the nearest rank
    assert lines[at + 2] == (
        f"  lengths: min {min(lengths)}, median {statistics.median(lengths):g}, p95 {p95}, max {max(lengths)} "
        f"tokens; {lengths.count(block)} of {kept} at block_size={block}"
    )
    bars = lines[at + 3 : lines.index(next(line for line in lines if line.startswith("validation: ")))]
    assert sum(int(bar.split()[-1]) for bar in bars) == kept
    # those longer than 64: a run warns once, with the block_size that keeps 95 % whole (of 12, the 12th shortest)
    does = {"truncate": "cuts", "drop": "drops"}[truncation]
    assert f"warning: {too_long} of 12 training examples are longer than block_size={block}, which {does} them; " \
           f"block_size={sorted(totals)[-(-95 * 12 // 100) - 1]} would keep 95 % of them whole" in lines  # fmt: skip


def test_a_block_size_past_the_models_context_is_not_what_the_cut_warning_advises():
    """Self-Instruct through the tiny model's template: 145 of 155 cut at 128, and 95 % whole would take 1263 tokens,
    past tiny's 1024; here lengths of that shape."""
    from transfer.run import _cut_examples

    cfg = compose_config(["objective=sft"])
    whole = [100] * 10 + [500] * 137 + [2000] * 8  # the 148th shortest of 155 (95 %, nearest rank) is 2000
    assert _cut_examples(whole, cfg, None) == (  # the context from the model's config: tiny's 1024
        "145 of 155 training examples are longer than block_size=128, which cuts them; keeping 95 % of them whole "
        "would take block_size=2000, past the model's context of 1024 tokens (at 1024, 8 are still cut)"
    )
    # a loaded model's context (a hub model's config is known only then) is the one that counts
    assert _cut_examples(whole, cfg, 4096).endswith("; block_size=2000 would keep 95 % of them whole")
    assert _cut_examples([100] * 95 + [129] * 5, cfg, None) is None  # 5 % cut: 95 % whole already


def test_a_bad_override_is_one_line(capsys):
    assert main(["objective=sft", "dataset=nowhere"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown dataset 'nowhere'; allowed: " in err


def test_one_of_a_kind_is_counted_in_the_singular(tmp_path, capsys):
    """A split of one row printed `1 rows read -> 1 sequences`."""
    one = tmp_path / "one.jsonl"
    one.write_text(INSTRUCTIONS.read_text().splitlines()[0] + "\n")
    files = [f"dataset.{s}_files=[{one}]" for s in ("train", "validation", "test")]
    out = preview(["--n", "1", "objective=sft", "dataset=text_files", *files], capsys)
    counts = [line for line in out.splitlines() if line.startswith(("train: ", "validation: ", "test: "))]
    assert len(counts) == 3 and all(re.search(r": 1 row read -> 1 sequence, \d+ tokens", line) for line in counts)

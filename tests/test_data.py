"""Text -> blocks: every token counted once, splits fixed, bad data refused."""

import json

import pytest
import torch
from omegaconf import OmegaConf

from transfer.config.compose import compose_config
from transfer.config.data import TextFilesDataset
from transfer.data.blocks import first_tokens, to_blocks, tokenize
from transfer.data.sequences import IGNORE, evaluation_batches
from transfer.data.sources import load_rows, load_texts, read_files
from transfer.errors import TransferError
from transfer.models.load import byte_tokenizer
from transfer.objectives import build_objective

EOS = byte_tokenizer().eos_token_id


def files_cfg(**kwargs):
    return OmegaConf.merge(OmegaConf.structured(TextFilesDataset), {"name": "t", **kwargs})


def lm_splits(overrides: list[str], max_eval_tokens: int | None = None, dataset=None) -> dict:
    """The splits the lm objective makes of a composed config (its dataset, or the one given)."""
    cfg = compose_config(overrides)
    if dataset is not None:
        cfg.dataset = dataset
    return build_objective(cfg, byte_tokenizer()).prepare(max_eval_tokens)


def test_blocks_keep_every_token_for_evaluation_and_whole_blocks_for_training():
    ids = list(range(10))
    train = to_blocks(ids, 4, keep_partial=False)
    assert [train.get(i)[0].tolist() for i in range(len(train))] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert train.tokens == 8 and train.scored() == 2 * 3  # a block's first token is predicted from nothing
    ev = to_blocks(ids, 4, keep_partial=True)
    assert ev.lengths().tolist() == [4, 4, 2] and ev.tokens == 10
    (batch,) = evaluation_batches(ev, 3, pad_id=99)  # the short last block is padded, its padding unscored
    assert batch.input_ids.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 99, 99]]
    assert batch.labels[-1].tolist() == [8, 9, IGNORE, IGNORE]
    assert batch.normaliser == 3 + 3 + 1 and batch.tokens == 10


def test_tokenize_ends_every_document_with_end_of_text():
    tok = byte_tokenizer()
    ids, _ = tokenize(["ab", "c"], tok, EOS)
    assert ids == [tok.convert_tokens_to_ids("a"), tok.convert_tokens_to_ids("b"), tok.eos_token_id,
                   tok.convert_tokens_to_ids("c"), tok.eos_token_id]  # fmt: skip


def test_default_corpus_is_split_by_topic():
    cfg = compose_config([]).dataset
    topics = {}
    for split in ("train", "validation", "test"):
        rows = [json.loads(line) for f in cfg[f"{split}_files"] for line in open(f)]
        topics[split] = {r["topic"] for r in rows}
        texts = [r["text"] for r in rows]
        assert len(set(texts)) == len(texts), f"duplicate passages in {split}"
    assert not topics["train"] & topics["validation"]
    assert not topics["train"] & topics["test"]
    assert not topics["validation"] & topics["test"]
    texts = load_texts(cfg)
    assert sum(len(t) for t in texts.values()) >= 250
    assert len(set().union(*topics.values())) >= 13


def test_missing_splits_are_held_out_from_train_deterministically(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"body": f"document {i}"}) + "\n" for i in range(100)))
    cfg = files_cfg(train_files=[str(path)], text_field="body", holdout_fraction=0.1)
    a, b = load_texts(cfg), load_texts(cfg)
    assert a == b
    assert [len(a[s]) for s in ("train", "validation", "test")] == [80, 10, 10]
    assert set(a["train"]).isdisjoint(a["validation"]) and set(a["train"]).isdisjoint(a["test"])
    assert set(a["validation"]).isdisjoint(a["test"])


@pytest.mark.parametrize("suffix", [".txt", ".csv", ".parquet", ".json"])
def test_file_types(tmp_path, suffix):
    docs = [f"paragraph {i} about traits" for i in range(40)]
    path = tmp_path / f"train{suffix}"
    if suffix == ".txt":
        path.write_text("\n\n".join(docs))
    else:
        import pandas as pd

        frame = pd.DataFrame({"text": docs})
        {".csv": lambda: frame.to_csv(path, index=False), ".parquet": lambda: frame.to_parquet(path),
         ".json": lambda: frame.to_json(path, orient="records", lines=True)}[suffix]()  # fmt: skip
    texts = load_texts(files_cfg(train_files=[str(path)], holdout_fraction=0.1))
    assert sorted(texts["train"] + texts["validation"] + texts["test"]) == sorted(docs)


def test_a_train_split_shorter_than_a_block_is_refused(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps({"text": "tiny"}) + "\n" for _ in range(30)))
    with pytest.raises(TransferError, match="fewer than one block"):
        lm_splits(["block_size=512"], dataset=files_cfg(train_files=[str(path)], holdout_fraction=0.1))


def test_unsupported_file_type(tmp_path):
    path = tmp_path / "t.docx"
    path.write_text("x")
    with pytest.raises(TransferError, match=r"unsupported type; allowed: \.txt, \.jsonl"):
        load_texts(files_cfg(train_files=[str(path)]))


def test_same_evaluation_blocks_every_time():
    cfg = compose_config(["block_size=64"])
    a, b = lm_splits(["block_size=64"]), lm_splits(["block_size=64"])
    for split in ("validation", "test"):
        assert torch.equal(a[split].ids, b[split].ids) and torch.equal(a[split].starts, b[split].starts)
        assert a[split].tokens == sum(len(t.encode()) + 1 for t in load_texts(cfg.dataset)[split])


def test_eval_max_tokens_keeps_the_first_tokens_of_validation_and_test():
    cfg = compose_config(["block_size=64"])
    whole = lm_splits(["block_size=64"])
    capped = lm_splits(["block_size=64"], max_eval_tokens=1000)
    assert torch.equal(capped["train"].ids, whole["train"].ids)  # training text is never cut
    texts = load_texts(cfg.dataset)
    for split in ("validation", "test"):
        blocks = capped[split]
        assert blocks.tokens == 1000 and blocks.lengths().tolist() == [64] * 15 + [40]  # 15 whole blocks and 40 tokens
        assert torch.equal(blocks.ids, whole[split].ids[:1000])
        starts, position = [], 0  # where each document begins (bytes + end-of-text)
        for text in texts[split]:
            starts.append(position)
            position += len(text.encode()) + 1
        assert blocks.documents == sum(start < 1000 for start in starts)  # whole or in part


def test_a_cut_split_counts_the_documents_it_touches():
    ids, starts = tokenize(["abc<|endoftext|>def", "ghi"], byte_tokenizer(), EOS)  # end-of-text inside a text
    assert starts == [0, 8] and len(ids) == 12
    assert first_tokens(ids, starts, 8) == (ids[:8], 1)
    assert first_tokens(ids, starts, 9) == (ids[:9], 2)
    assert first_tokens(ids, starts, None) == (ids, 2)


def test_the_token_that_joins_documents_is_chosen_and_recorded():
    eos = lm_splits(["block_size=64"])["validation"]
    joined_by_nothing = lm_splits(["block_size=64", "objective.separator=none"])["validation"]
    assert eos.tokens - joined_by_nothing.tokens == eos.documents  # one end-of-text token a document
    cfg = compose_config(["objective.separator=none"])
    objective = build_objective(cfg, byte_tokenizer())
    objective.prepare(None)
    assert objective.describe()["separator"] is None
    objective = build_objective(compose_config([]), byte_tokenizer())
    objective.prepare(None)
    assert objective.describe()["separator"] == "<|endoftext|>"


# ---------------------------------------------------------------- rows of examples: each problem names its file and line
PAIRS = [("prompt", "completion")]


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def sft_objective(train_file: str, *overrides: str, tokenizer=None):
    cfg = compose_config(["objective=sft", "dataset=text_files", f"dataset.train_files=[{train_file}]",
                          "block_size=64", *overrides])  # fmt: skip
    return build_objective(cfg, tokenizer or byte_tokenizer())


def test_a_held_out_row_with_a_null_answer_is_named_by_its_file_and_row(tmp_path):
    """Parquet rows are read by the loader alone (start-up reads the schema): the file and row are named, not the
    index of the split that the holdout carved the row into."""
    import pandas as pd

    rows = [{"prompt": f"Question {i}?", "completion": f" Answer {i}."} for i in range(40)]
    clean = tmp_path / "clean.parquet"
    pd.DataFrame(rows).to_parquet(clean)
    held = load_rows(files_cfg(train_files=[str(clean)], holdout_fraction=0.1), PAIRS)
    assert [len(held[s]) for s in ("train", "validation", "test")] == [32, 4, 4]
    place = held["validation"][0].origin
    assert place.startswith(f"dataset.train_files: {str(clean)!r} row ")
    number = int(place.rsplit(" ", 1)[1])
    assert held["validation"][0]["prompt"] == f"Question {number - 1}?"  # the row it names is the row it holds
    rows[number - 1]["completion"] = None
    bad = tmp_path / "bad.parquet"
    pd.DataFrame(rows).to_parquet(bad)
    with pytest.raises(TransferError) as refused:
        sft_objective(str(bad), "dataset.holdout_fraction=0.1").prepare(None)
    assert str(refused.value) == (
        f"dataset.train_files: {str(bad)!r} row {number}: 'completion' is missing or null; "
        "allowed: text or a list of messages"
    )


@pytest.mark.parametrize("blank_lines", [False, True], ids=["dense", "with-blank-lines"])
def test_rows_know_their_line_in_json_lines_json_csv_and_text(tmp_path, blank_lines):
    gap = "\n\n" if blank_lines else "\n"
    (tmp_path / "a.jsonl").write_text(
        gap.join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) for i in range(3))
    )
    (tmp_path / "a.json").write_text("[" + f",{gap}".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"})
                                                          for i in range(3)) + "]")  # fmt: skip
    (tmp_path / "a.csv").write_text("prompt,completion\n" + gap.join(f'"q{i}\nsecond line",a{i}' for i in range(3)))
    lines = {"a.jsonl": [1, 3, 5], "a.json": [1, 3, 5], "a.csv": [2, 5, 8]} if blank_lines else \
            {"a.jsonl": [1, 2, 3], "a.json": [1, 2, 3], "a.csv": [2, 4, 6]}  # fmt: skip
    for name, expected in lines.items():
        rows = read_files(files_cfg(), [str(tmp_path / name)], "dataset.train_files", PAIRS)
        assert [r.origin for r in rows] == [f"dataset.train_files: {str(tmp_path / name)!r} line {n}" for n in expected]
        assert [r["completion"] for r in rows] == ["a0", "a1", "a2"]
    (tmp_path / "a.txt").write_text("one\n\ntwo\nmore\n\n\n\nthree\n")
    rows = read_files(files_cfg(), [str(tmp_path / "a.txt")], "dataset.train_files")
    assert [(r["text"], r.origin.rsplit(" ", 1)[1]) for r in rows] == [
        ("one", "1"),
        ("two\nmore", "3"),
        ("three\n", "8"),
    ]


def test_empty_answers_are_counted_and_placed_and_refused_when_every_answer_is_empty(tmp_path, caplog):
    import logging

    import pandas as pd

    rows = [{"prompt": f"Q{i}?", "completion": f" A{i}."} for i in range(30)]
    for i in (4, 11):
        rows[i]["completion"] = "  "
    path = write_jsonl(tmp_path / "some.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="transfer"):
        load_rows(files_cfg(train_files=[path], validation_files=[path], test_files=[path]), PAIRS)
    assert (
        f"dataset 't' train: 2 of 30 rows have an empty answer (dataset.train_files: {path!r} line 5, ...): "
        "nothing of their answers is scored, only the end of the turn"
    ) in caplog.messages
    empty = tmp_path / "empty.parquet"  # not read at start-up: the loader refuses
    pd.DataFrame([{"prompt": f"Q{i}?", "completion": ""} for i in range(30)]).to_parquet(empty)
    with pytest.raises(TransferError) as refused:
        sft_objective(str(empty), f"dataset.validation_files=[{empty}]", f"dataset.test_files=[{empty}]").prepare(None)
    assert str(refused.value) == (
        f"dataset 'text_files' train: the answer of every one of its 30 rows is empty (dataset.train_files: "
        f"{str(empty)!r} row 1, ...): nothing of an answer would be scored, only the end of each turn; "
        "allowed: rows with answers"
    )


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".json", ".txt"])
def test_a_byte_order_mark_is_not_part_of_the_first_field(tmp_path, suffix):
    import pandas as pd

    docs = [f"paragraph {i} about traits" for i in range(40)]
    path = tmp_path / f"train{suffix}"
    if suffix == ".txt":
        path.write_text("\n\n".join(docs), encoding="utf-8-sig")
    else:
        frame = pd.DataFrame({"text": docs})
        text = {".csv": lambda: frame.to_csv(index=False), ".jsonl": lambda: frame.to_json(orient="records", lines=True),
                ".json": lambda: frame.to_json(orient="records")}[suffix]()  # fmt: skip
        path.write_text(text, encoding="utf-8-sig")
    texts = load_texts(files_cfg(train_files=[str(path)], holdout_fraction=0.1))
    assert sorted(texts["train"] + texts["validation"] + texts["test"]) == sorted(docs)


def test_csv_cells_are_the_text_written_not_numbers_or_nulls(tmp_path):
    from transfer.data.chat import to_unpaired

    path = tmp_path / "sums.csv"
    path.write_text("prompt,completion\n" + "".join(f"{i} plus {i}?,{2 * i}\n" for i in range(20)) + "Say NA.,NA\n")
    rows = load_rows(files_cfg(train_files=[str(path)], validation_files=[str(path)], test_files=[str(path)]), PAIRS)
    assert [r["completion"] for r in rows["train"]] == [str(2 * i) for i in range(20)] + ["NA"]
    cfg = compose_config(["objective=kto"]).dataset
    assert [to_unpaired({"prompt": "Q", "completion": "A", "label": v}, cfg, "row")[1] for v in ("1", "0", "True")] == [
        True, False, True]  # fmt: skip


def test_json_lines_may_hold_unicode_line_separators_inside_strings(tmp_path):
    from transfer.config.preflight import check_data_files

    path = tmp_path / "u2028.jsonl"
    path.write_text("".join(json.dumps({"text": f"a\u2028b{i}"}, ensure_ascii=False) + "\n" for i in range(3)))
    check_data_files([str(path)], "dataset.train_files", [("text",)])  # no "line 1 is not JSON"
    assert [r["text"] for r in read_files(files_cfg(), [str(path)], "dataset.train_files")] == [
        f"a\u2028b{i}" for i in range(3)]  # fmt: skip


def test_valid_rows_pass_the_start_up_check_labels_included(tmp_path):
    from transfer.config.checks import check_inputs

    rows = [{"prompt": f"Q{i}?", "completion": " A.", "good": [True, False, 1, 0][i % 4]} for i in range(20)]
    path = write_jsonl(tmp_path / "kto.jsonl", rows)
    check_inputs(compose_config(["objective=kto", "dataset=text_files", f"dataset.train_files=[{path}]",
                                 "dataset.label_field=good"]))  # fmt: skip
    talks = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}] * 20
    check_inputs(compose_config(["objective=sft", "dataset=text_files",
                                 f"dataset.train_files=[{write_jsonl(tmp_path / 'talks.jsonl', talks)}]"]))  # fmt: skip


ALTERNATE = (  # what Llama-2's and Mistral's templates do with a conversation they do not take
    "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "<|{{ m['role'] }}|>{{ m['content'] }}<|endoftext|>{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.mark.parametrize(
    "template, problem",
    [(ALTERNATE, "Conversation roles must alternate user/assistant"), ("{% for m in messages %}{{ m.content }", "unexpected '}'")],
    ids=["refuses-the-conversation", "does-not-parse"],
)  # fmt: skip
def test_a_chat_template_that_fails_is_one_line_naming_the_row(tmp_path, template, problem):
    rows = [{"prompt": f"Q{i}?", "completion": f" A{i}."} for i in range(30)]
    rows[5] = {"prompt": [{"role": "system", "content": "Be brief."}], "completion": "Yes."}
    path = write_jsonl(tmp_path / "system.jsonl", rows)
    tokenizer = byte_tokenizer()
    tokenizer.chat_template = template
    with pytest.raises(TransferError) as refused:
        sft_objective(path, f"dataset.validation_files=[{path}]", f"dataset.test_files=[{path}]",
                      tokenizer=tokenizer).prepare(None)  # fmt: skip
    line = str(refused.value)
    line_of_row = 6 if template == ALTERNATE else 1  # a syntax error fails on the first row
    assert line.startswith(f"dataset.train_files: {path!r} line {line_of_row}: the tokenizer's chat template ")
    assert problem in line and "\n" not in line


def test_pairs_the_same_as_written_are_counted_apart_from_truncation_and_placed(tmp_path, caplog):
    import logging

    rows = [{"prompt": f"Is {i} a number?", "chosen": " Yes.", "rejected": " No."} for i in range(20)]
    for i in (3, 9):
        rows[i] = {"prompt": "Q?", "chosen": " Same.", "rejected": " Same."}
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    cfg = compose_config(["objective=dpo", "dataset=text_files", f"dataset.train_files=[{path}]",
                          f"dataset.validation_files=[{path}]", f"dataset.test_files=[{path}]", "block_size=64"])  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="transfer"):
        splits = build_objective(cfg, byte_tokenizer()).prepare(None)
    info = splits["train"].summary()
    assert (info["identical_in_file"], info["identical_after_truncation"], info["pairs"]) == (2, 0, 18)
    assert (
        f"dataset 'text_files' train: 2 pairs left out, their chosen and rejected answers the same as written "
        f"(dataset.train_files: {path!r} line 4, ...)"
    ) in caplog.messages


# ---------------------------------------------------------------- python -m transfer.tasks.movielens
def movielens_raw(folder, ratings: str | None = None):
    """A small ml-latest-small: 30 users with 14 ratings each of 20 movies (or the ratings.csv text given)."""
    folder.mkdir()
    (folder / "movies.csv").write_text("movieId,title,genres\n" + "".join(f'{m},"Movie {m} (1999)",Drama\n'
                                                                       for m in range(1, 21)))  # fmt: skip
    if ratings is None:
        ratings = "userId,movieId,rating,timestamp\n" + "".join(
            f"{u},{(u + k) % 20 + 1},{1 + (u * k) % 5}.0,{1000 + k}\n" for u in range(1, 31) for k in range(14)
        )
    (folder / "ratings.csv").write_text(ratings)
    return folder


def test_movielens_builds_each_split_and_keeps_an_earlier_build_unless_told(tmp_path, capsys):
    from transfer.tasks.movielens import main

    raw, out = movielens_raw(tmp_path / "raw"), tmp_path / "out"
    main(["--raw", str(raw), "--out", str(out), "--history", "4", "--per-user", "2"])
    rows = {s: [json.loads(line) for line in (out / f"{s}.jsonl").open()] for s in ("train", "validation", "test")}
    assert [len(rows[s]) for s in rows] == [48, 6, 6]  # 24/3/3 users, 2 examples each
    assert all(r["completion"] == ("Yes" if r["rating"] >= 4 else "No") for split in rows.values() for r in split)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        main(["--raw", str(raw), "--out", str(out), "--seed", "1"])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert err == (f"error: --out {out} holds train.jsonl, validation.jsonl, test.jsonl, README.txt already "
                   "(an earlier build); allowed: another folder, or --overwrite to replace them\n")  # fmt: skip
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    main(["--raw", str(raw), "--out", str(out), "--seed", "1", "--history", "4", "--per-user", "2", "--overwrite"])
    assert (out / "train.jsonl").read_bytes() != before["train.jsonl"]


@pytest.mark.parametrize(
    "ratings, message",
    [
        ("userId,movieId,score,timestamp\n1,1,4.0,1\n", "ratings.csv has no column 'rating' (its header: userId,movieId,score,timestamp)"),
        ("userId,movieId,rating,timestamp\n1,1,4.0,1\n1,2,four,2\n", "ratings.csv line 3: rating 'four' is not a number"),
        ("userId,movieId,rating,timestamp\n1,1,nan,1\n", "ratings.csv line 2: rating 'nan' is not a number"),
        ("", "ratings.csv is empty"),
        ("userId,movieId,rating,timestamp\n", "ratings.csv holds a header and no rows"),
        ("userId,movieId,rating,timestamp\n1,99,4.0,1\n", "ratings.csv line 2: movieId 99 is not in"),
        (None, "--out {out}: {out} is a file; allowed: a folder"),
    ],
    ids=["no-rating-column", "a-word-for-a-rating", "nan", "empty", "header-only", "unknown-movie", "out-is-a-file"],
)  # fmt: skip
def test_movielens_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, ratings, message):
    from transfer.tasks.movielens import main

    raw, out = movielens_raw(tmp_path / "raw", ratings), tmp_path / "out"
    if ratings is None:
        out.write_text("notes I keep\n")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(SystemExit) as stopped:
        main(["--raw", str(raw), "--out", str(out)])
    assert stopped.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("error: ") and captured.err.count("\n") == 1
    assert message.format(out=out) in captured.err
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_a_byte_that_is_not_utf_8_is_placed_in_a_file_with_a_byte_order_mark(tmp_path):
    from transfer.config.preflight import check_data_files

    path = tmp_path / "marked.txt"
    path.write_bytes(b"\xef\xbb\xbfone\ntwo\ncaf\xe9\n")
    with pytest.raises(TransferError, match=r"marked.txt' line 3 is not UTF-8 \(byte 0xe9 at offset 14\)"):
        check_data_files([str(path)], "dataset.train_files", [("text",)])

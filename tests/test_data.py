"""Text -> blocks: every token counted once, splits fixed, bad data refused."""

import json

import pytest
import torch
from omegaconf import OmegaConf

from transfer import schema
from transfer.data.blocks import first_tokens, to_blocks, tokenize
from transfer.data.sequences import IGNORE, evaluation_batches
from transfer.data.sources import load_texts
from transfer.errors import TransferError
from transfer.models import byte_tokenizer
from transfer.objectives import build_objective
from transfer.validate import compose_config

EOS = byte_tokenizer().eos_token_id


def files_cfg(**kwargs):
    return OmegaConf.merge(OmegaConf.structured(schema.TextFilesDataset), {"name": "t", **kwargs})


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

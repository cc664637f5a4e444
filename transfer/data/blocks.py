"""Text -> blocks of tokens, for language modelling and the reference corpus.

Each split's documents are tokenized, joined with a separator token (the tokenizer's
end-of-text by default; `objective.separator` for `lm`) and cut into non-overlapping blocks
of `block_size` tokens. Training uses whole blocks only; evaluation keeps the last partial
block too, so every token of a split is scored except the first of each block, which has no
context to be predicted from; the same blocks serve before and after training.
"""

import bisect

import torch

from transfer import cache
from transfer.data.sequences import Sequences
from transfer.errors import TransferError


def separator_id(tokenizer, separator: str = "eos") -> tuple[str | None, int | None]:
    """(token, id) that joins documents: the tokenizer's end-of-text for "eos", or a named token; (None, None) for "none"."""
    if separator == "none" or separator == "eos" and tokenizer.eos_token is None:
        return None, None
    token = tokenizer.eos_token if separator == "eos" else separator
    token_id = tokenizer.convert_tokens_to_ids(token) if token is not None else None
    if token_id is None or token_id == tokenizer.unk_token_id and token != tokenizer.unk_token:
        specials = ", ".join(dict.fromkeys(t for t in tokenizer.all_special_tokens if t))
        raise TransferError(
            f"objective.separator={separator!r} is no token of this tokenizer; allowed: eos, none, or one of {specials}"
        )
    return token, token_id


def tokenize(texts: list[str], tokenizer, separator: int | None) -> tuple[list[int], list[int]]:
    """Token ids of all documents, each ending in the separator, and where each document starts.

    The starts count documents exactly, even with no separator or one inside a text.
    """
    ids: list[int] = []
    starts: list[int] = []
    for start in range(0, len(texts), 1000):
        for doc in tokenizer(texts[start : start + 1000], verbose=False)["input_ids"]:  # long documents are cut later
            starts.append(len(ids))
            ids.extend(doc)
            if separator is not None and (not doc or doc[-1] != separator):
                ids.append(separator)
    return ids, starts


def first_tokens(ids: list[int], starts: list[int], max_tokens: int | None) -> tuple[list[int], int]:
    """The first max_tokens of a split (all when None), and how many documents they touch, whole or in part."""
    if max_tokens is None or len(ids) <= max_tokens:
        return ids, len(starts)
    return ids[:max_tokens], bisect.bisect_left(starts, max_tokens)


def to_blocks(ids: list[int], block_size: int, keep_partial: bool, documents: int = 0) -> Sequences:
    """Blocks of `block_size` tokens, every token scored; with keep_partial, the shorter last block too."""
    n = len(ids) if keep_partial else len(ids) - len(ids) % block_size
    flat = torch.tensor(ids[:n], dtype=torch.long)
    starts = torch.tensor([*range(0, n, block_size), n], dtype=torch.long)
    return Sequences(flat, flat.clone(), starts, documents=documents)


def text_blocks(texts: list[str], tokenizer, block_size: int, separator: int | None, keep_partial: bool,
                max_tokens: int | None = None, where: str = "the split") -> Sequences:  # fmt: skip
    """Tokenize, join, cut: the blocks of one split (the first max_tokens tokens of it, when given)."""
    ids, starts = cache.tokens(texts, tokenizer, separator, lambda: tokenize(texts, tokenizer, separator))
    if not ids:
        raise TransferError(f"{where} is empty (no text)")
    ids, documents = first_tokens(ids, starts, max_tokens)
    blocks = to_blocks(ids, block_size, keep_partial, documents)
    if len(blocks) == 0:
        raise TransferError(
            f"{where} has {len(ids)} tokens, fewer than one block (block_size={block_size}); "
            f"allowed: block_size <= {len(ids)}, or more text"
        )
    return blocks

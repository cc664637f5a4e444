"""Forgetting probes (eval.probes) -> token sequences scored by perplexity before and after training.

A `text` probe is raw text cut into blocks, every token scored (like the validation split of `lm`).
An `instructions` probe is examples framed as the model would be asked them (its chat template,
or the plain one) with only the answers scored: an Instruct model's forgetting shows there and
not in prose. Each probe is a split named `ref_<name>`; what the record says of it comes from
`describe`, including whether it is of the training data's own genre, where a fall in perplexity
is transfer rather than an absence of forgetting.
"""

from transfer.data.blocks import separator_id, text_blocks
from transfer.data.chat import detect_format, fitted_examples, template_of, to_example
from transfer.data.sequences import Sequences
from transfer.data.sources import python_docs_prose, read_files, read_hub
from transfer.errors import TransferError

PREFIX = "ref_"


def probe_splits(cfg, tokenizer) -> dict[str, Sequences]:
    """Every probe of eval.probes as sequences, by split name (ref_<name>), in the config's order."""
    return {
        PREFIX + name: _sequences(name, probe, tokenizer, cfg.block_size) for name, probe in cfg.eval.probes.items()
    }


def describe(cfg, tokenizer) -> dict[str, dict]:
    """What the record keeps of each probe: where it comes from, how it is framed, whether it shares the data's genre."""
    genre = cfg.dataset.get("genre")
    return {
        PREFIX + name: {
            "source": probe.source.value,
            "kind": probe.kind.value,
            "format": "text" if probe.kind.value == "text" else template_of(tokenizer, "auto"),
            "genre": probe.genre,
            "same_genre_as_training": probe.genre is not None and probe.genre == genre,
        }
        for name, probe in cfg.eval.probes.items()
    }


def _sequences(name: str, probe, tokenizer, block_size: int) -> Sequences:
    where = f"eval.probes.{name}"
    if probe.kind.value == "instructions":
        return _instructions(_rows(probe, where, _example_fields(probe)), probe, tokenizer, block_size, where)
    texts = [row[probe.text_field] for row in _rows(probe, where, [(probe.text_field,)])]
    _, eos = separator_id(tokenizer, "eos")
    return text_blocks(texts, tokenizer, block_size, eos, keep_partial=True, max_tokens=probe.max_tokens,
                       where=f"{where} (field {probe.text_field!r})")  # fmt: skip


def _rows(probe, where: str, needs: list[tuple[str, ...]]) -> list[dict]:
    source = probe.source.value
    if source == "python_docs":  # start-up checked its kind and part, files' files, hub's path (validate.check_inputs)
        return [{probe.text_field: t} for t in python_docs_prose(probe.part)]
    if source == "files":
        return read_files(probe, list(probe.files), f"{where}.files", needs)
    return read_hub(probe, probe.split, f"{where}.path={probe.path!r} split {probe.split!r}", needs)


def _example_fields(probe) -> list[tuple[str, ...]]:
    from transfer.config.objective import OBJECTIVES  # an instructions probe's rows are read as sft's examples

    return OBJECTIVES["sft"].fields(probe)


def _instructions(rows: list[dict], probe, tokenizer, block_size: int, where: str) -> Sequences:
    """The examples as `sft` validates them: the answer's tokens scored, cut to block_size, up to max_tokens."""
    template = template_of(tokenizer, "auto")
    fmt = detect_format(rows[0], probe, where) if rows else None
    items = ((to_example(row, fmt, probe, f"{where} row {n}"), None) for n, row in enumerate(rows, start=1))
    ids_list, labels_list, _, counts = fitted_examples(items, tokenizer, template, False, block_size, False,
                                                       probe.max_tokens)  # fmt: skip
    if not ids_list:
        raise TransferError(f"{where}: no example with an answer among {len(rows)} rows; allowed: rows with answers")
    info = {"examples": len(ids_list), **counts, "format": fmt, "template": template}
    return Sequences.from_lists(ids_list, labels_list, documents=len(ids_list), info=info)

"""`python -m transfer.preview [--n N] [--split S] OVERRIDES`: a run's data as its model will see it, before a run.

The overrides are a run's (`objective=sft dataset=movielens model=tiny`): the config is composed
and checked as `python -m transfer` checks it (config.compose.check_command_line), then the
objective prepares its splits with the model's tokenizer alone (the model is built on the meta
device: no weights read, none downloaded). Shown:

- the first N examples of a split, token by token as the model reads them (the template's
  framing and special tokens included), the scored tokens (labels != -100: what the loss counts)
  marked apart from the masked ones: in colour on a terminal, between [[ and ]] otherwise
  (--colour always|never to choose); a preference objective's pairs show the chosen and the
  rejected answer each, KTO's answers whether they are desirable;
- for every split: rows read, sequences kept, tokens and scored tokens, how many examples
  truncation cut (at the prompt's start or the answer's end) or dropped (too long with
  objective.truncation=drop, no answer left, a pair truncated into sameness), and the length
  distribution (min, median, p95, max, and a text histogram) against block_size.

A masking mistake (an answer not scored, a prompt scored, the turn's end left out) shows here
before it costs a run. Validation and test are read up to eval.max_tokens, as a run reads them.
"""

import argparse
import math
import statistics
import sys
from itertools import groupby

from transfer.data.sources import SPLITS
from transfer.errors import TransferError
from transfer.fmt import count, reader_may_leave

SCORED = ("[[", "]]")  # the plain marking of scored tokens
ANSI = {"scored": "\x1b[1;32m", "masked": "\x1b[2m", "end": "\x1b[0m"}  # bold green; dim
COUNTS = {  # the splits' counts of what truncation did, as the record's data.<split> names them
    "truncated_prompt": "prompt", "truncated_response": "response", "dropped_too_long": "too long",
    "dropped_no_answer": "no answer left", "identical_after_truncation": "pair made identical",
    "identical_in_file": "pair identical as written",
}  # fmt: skip
BAR = 40  # the histogram's longest bar, in characters


def compose(overrides: list[str]):
    """The config of the run these overrides make, checked as `python -m transfer` checks it."""
    from transfer.config.compose import check_command_line

    plan = check_command_line(list(overrides))
    if plan is None:
        raise TransferError("hydra's own flags (--help, --cfg, --config-dir) are not previewed; allowed: overrides")
    return plan.configs[0]


def prepare(cfg):
    """(tokenizer, objective, splits): the objective's data, made with the tokenizer alone."""
    from transfer.models.load import load_model_and_tokenizer
    from transfer.objectives import build_objective

    _, tokenizer = load_model_and_tokenizer(cfg.model, cfg.block_size, weights=False)  # the meta device: no weights
    objective = build_objective(cfg, tokenizer)
    return tokenizer, objective, objective.prepare(cfg.eval.max_tokens)


# ---------------------------------------------------------------- examples
def units(split, n: int) -> list[list[tuple[str, list[int], list[bool]]]]:
    """The split's first n training units, each as its sequences: (what it is, ids, whether each token is scored)."""
    pairs = getattr(split, "pairs", None)
    desirable = getattr(split, "desirable", None)
    if pairs is not None:  # a preference pair: its chosen and its rejected answer
        return [[(name, *_scored(split.get(int(i)))) for name, i in zip(("chosen", "rejected"), pair, strict=True)]
                for pair in pairs[:n]]  # fmt: skip
    if desirable is not None:  # KTO's unpaired answers
        return [[("desirable" if desirable[i] else "undesirable", *_scored(split.get(i)))]
                for i in range(min(n, len(split)))]  # fmt: skip
    return [[("", *_scored(split.get(i)))] for i in range(min(n, len(split)))]


def _scored(item) -> tuple[list[int], list[bool]]:
    from transfer.data.sequences import IGNORE

    ids, labels = item
    return ids.tolist(), (labels != IGNORE).tolist()


def marked(ids: list[int], scored: list[bool], tokenizer, colour: bool) -> str:
    """The tokens' text, each run of scored tokens marked apart from the masked runs around it."""
    pieces = []
    for is_scored, run in groupby(zip(ids, scored, strict=True), key=lambda pair: pair[1]):
        text = tokenizer.decode([t for t, _ in run], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if colour:
            pieces.append(f"{ANSI['scored' if is_scored else 'masked']}{text}{ANSI['end']}")
        else:
            pieces.append(f"{SCORED[0]}{text}{SCORED[1]}" if is_scored else text)
    return "".join(pieces)


def show_examples(split_name: str, split, n: int, tokenizer, colour: bool) -> list[str]:
    lines = []
    for number, unit in enumerate(units(split, n), start=1):
        for what, ids, scored in unit:
            title = f"{split_name} #{number}{f' {what}' if what else ''} · {count(len(ids), 'token')}, {sum(scored):,} scored"
            lines += [f"── {title} " + "─" * max(3, 76 - len(title)), marked(ids, scored, tokenizer, colour)]
    return lines


# ---------------------------------------------------------------- counts and lengths
def histogram(lengths: list[int], bins: int = 8) -> list[str]:
    """Equal-width bins from the shortest length to the longest, each with a bar and its count."""
    low, high = min(lengths), max(lengths)
    width = math.ceil((high - low + 1) / bins)
    counts = [0] * math.ceil((high - low + 1) / width)
    for length in lengths:
        counts[(length - low) // width] += 1
    digits, top = len(str(high)), max(counts)
    return [
        f"  {low + i * width:>{digits}}-{min(low + (i + 1) * width - 1, high):<{digits}} "
        f"{'#' * math.ceil(BAR * c / top):<{BAR}} {c:,}"
        for i, c in enumerate(counts)
    ]


def describe_split(name: str, split, block_size: int) -> list[str]:
    from transfer.data.sequences import percentile

    summary = split.summary()
    lengths = split.seqs.lengths().tolist() if hasattr(split, "seqs") else split.lengths().tolist()
    read = summary.get("examples", summary.get("rows", summary["documents"]))
    what = f"{count(summary['pairs'], 'pair')}, " if summary.get("pairs") else ""
    share = summary["scored_tokens"] / summary["tokens"] if summary["tokens"] else 0
    lines = [
        f"{name}: {count(read, 'row' if 'examples' in summary or 'rows' in summary else 'document')} read -> {what}"
        f"{count(summary['sequences'], 'sequence')}, {count(summary['tokens'], 'token')}, {summary['scored_tokens']:,} scored "
        f"({share:.1%})"
    ]
    if "truncated_prompt" in summary:  # examples, not blocks of text
        cut = summary["truncated_prompt"] + summary["truncated_response"]
        dropped = [k for k in COUNTS if k.startswith(("dropped", "identical"))]
        lines.append(
            f"  truncated {cut:,} (prompt {summary['truncated_prompt']:,}, response {summary['truncated_response']:,}); "
            f"dropped {sum(summary.get(k, 0) for k in dropped):,} ("
            + ", ".join(f"{COUNTS[k]} {summary[k]:,}" for k in dropped if k in summary)
            + ")"
        )
    at_limit = sum(length == block_size for length in lengths)
    lines.append(
        f"  lengths: min {min(lengths):,}, median {statistics.median(lengths):g}, p95 {percentile(lengths, 95):,}, "
        f"max {max(lengths):,} tokens; {at_limit:,} of {len(lengths):,} at block_size={block_size}"
    )
    return lines + histogram(lengths)


def report(cfg, n: int, split_name: str, colour: bool) -> list[str]:
    """What the preview prints: the settings, the examples of one split, every split's counts and lengths."""
    tokenizer, objective, splits = prepare(cfg)
    model = cfg.model.name_or_path or f"{cfg.model.name} (in the package)"
    template = getattr(objective, "template", None)
    head = [
        f"objective={cfg.objective.name} dataset={cfg.dataset.name} model={model} block_size={cfg.block_size}"
        + (f" template={template}" if template else "")
        + (f" truncation={cfg.objective.truncation.value}" if "truncation" in cfg.objective else ""),
        f"scored tokens {'in colour, masked ones dim' if colour else 'between [[ and ]]'}",
    ]
    lines = head + show_examples(split_name, splits[split_name], n, tokenizer, colour) + [""]
    for name, split in splits.items():
        lines += describe_split(name, split, cfg.block_size)
    from transfer.run import data_warnings  # what a run would warn of, from the same data

    return lines + [f"warning: {w}" for w in data_warnings(objective, splits, cfg)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m transfer.preview", description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="a run's overrides, e.g. objective=sft dataset=movielens")
    parser.add_argument("--n", type=int, default=3, help="examples shown (default 3)")
    parser.add_argument("--split", choices=SPLITS, default="train", help="whose examples are shown (default train)")
    parser.add_argument("--colour", "--color", choices=("auto", "always", "never"), default="auto",
                        help="mark scored tokens in colour (auto: on a terminal) or between [[ and ]]")  # fmt: skip
    args = parser.parse_args(argv)
    if args.n < 0:
        parser.error(f"--n {args.n}: allowed: 0 or more")
    colour = args.colour == "always" or (args.colour == "auto" and sys.stdout.isatty())
    try:
        cfg = compose(args.overrides)
        from transfer.export import quiet_libraries

        quiet_libraries()
        lines = report(cfg, args.n, args.split, colour)
    except TransferError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(reader_may_leave(main))

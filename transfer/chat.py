"""`python -m transfer.chat RUN`: talk to a finished run's model, as the run trained it.

The model is rebuilt as `python -m transfer.export` rebuilds it (export.rebuild: the run's model,
its parent, its strategy, then the weights of its final evaluation, or --weights best|last); a
peft adapter stays an adapter over its base, unmerged, as the run evaluated it. --base answers
with the model the run started from instead (its step 0: the base, or init_from's weights; a
peft adapter is taken off, not left at its initial values).

A prompt is framed as the run's objective framed its training examples: sft and the preference
objectives through their template (data/chat.py: the tokenizer's chat template, the plain one,
or none), `lm` as bare text to continue. A turn ends at the tokenizer's end-of-text, the model's
own end tokens (generation_config.json), or the token the template ends an assistant turn with
(`<|im_end|>`: the one the loss taught the model to stop with). Greedy by default, so an answer
is the one the run's samples would give; --temperature > 0 samples (with --seed).

Two forms:
- interactive: each line is a user turn, answered as the tokens come (transformers' TextStreamer);
  the conversation so far frames the next turn; /reset starts over, /quit or Ctrl-D ends;
- --prompts FILE (one prompt a line, or a .jsonl of {"prompt": ...} or {"messages": [...]}): each
  prompt answered on its own, written to RUN/chat/<file's name>.jsonl (or --out), never over an
  existing file: the next free name (<name>-2.jsonl, ...) instead; an --out that exists is refused.
"""

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from transfer.errors import TransferError, first_line
from transfer.fmt import reader_may_leave

CHAT_FOLDER = "chat"  # where the batch form writes, inside the run
UNTRAINED = {"which": "untrained (--base)", "step": 0, "folder": None}


@dataclass
class Settings:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0

    def generation_config(self, stops: list[int], pad: int):
        """Every choice set here: a model's generation_config.json (Qwen's samples at 0.7) must not change greedy."""
        from transformers import GenerationConfig

        sampled = self.temperature > 0
        return GenerationConfig(
            max_new_tokens=self.max_new_tokens, do_sample=sampled, temperature=self.temperature if sampled else 1.0,
            top_p=self.top_p if sampled else 1.0, top_k=0 if sampled else 50, eos_token_id=stops, pad_token_id=pad,
        )  # fmt: skip

    def describe(self) -> str:
        how = f"sampled at temperature {self.temperature:g}" if self.temperature > 0 else "greedy"
        if self.temperature > 0 and self.top_p < 1:
            how += f", top-p {self.top_p:g}"
        return f"{how}, up to {self.max_new_tokens} new tokens"


@dataclass
class Talker:
    """A run's model, its tokenizer and the template its objective framed examples with."""

    model: object
    tokenizer: object
    template: str  # chat | plain | none (lm: none)
    hardware: object
    described: str  # which model and weights, for people

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """The conversation so far (ending with a user turn) as the model reads it before answering."""
        from transfer.data.chat import Example, generation_prompt

        if self.template == "none":  # training read prompt + completion + <eos>: a transcript of those
            eos = self.tokenizer.eos_token or ""
            text = "".join(m["content"] + (eos if m["role"] == "assistant" else "") for m in messages)
        else:
            framed = Example([*messages, {"role": "assistant", "content": ""}])
            text = generation_prompt(framed, self.tokenizer, self.template)
        return self.tokenizer(text, add_special_tokens=self.template != "chat")["input_ids"]

    def stops(self) -> list[int]:
        """The ids that end an answer: end-of-text, the model's own end tokens, and the template's turn end."""
        from transfer.data.chat import Example, render

        tok = self.tokenizer
        ends = {tok.eos_token_id}
        configured = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        ends.update(configured if isinstance(configured, list) else [configured])
        sample = Example([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], raw=("x", "y"))
        text, spans = render(sample, tok, self.template)
        _, stop, end = spans[-1]
        turn_end = text[stop:end].strip()
        if turn_end and tok.convert_tokens_to_ids(turn_end) not in (None, tok.unk_token_id):
            ends.add(tok.convert_tokens_to_ids(turn_end))
        return sorted(e for e in ends if e is not None)

    def reply(self, messages: list[dict], settings: Settings, streamer=None) -> dict:
        """The model's answer to the conversation: {completion, completion_ids, prompt_tokens, stopped}."""
        import torch

        from transfer.training.hardware import uncompiled

        tok, stops = self.tokenizer, self.stops()
        pad = tok.pad_token_id if tok.pad_token_id is not None else stops[0]
        ids = torch.tensor([self.prompt_ids(messages)], device=self.hardware.device)
        if settings.temperature > 0:
            torch.manual_seed(settings.seed)
        with torch.no_grad(), self.hardware.autocast(), uncompiled():
            out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), streamer=streamer,
                                      generation_config=settings.generation_config(stops, pad))  # fmt: skip
        new = out[0, ids.shape[1] :].tolist()
        ended = bool(new) and new[-1] in stops
        return {
            "completion": tok.decode(new, skip_special_tokens=True),
            "completion_ids": new,
            "prompt_tokens": ids.shape[1],
            "stopped": "end of turn" if ended else "max_new_tokens",
        }


def load(run_dir: Path, which: str | None = None, base: bool = False) -> Talker:
    """The run's model with the chosen weights (or the one it started from) on the device its hardware settings pick."""
    from transfer.config.strategy import STRATEGIES
    from transfer.export import describe_weights, pick_weights, read_run, rebuild, run_config

    run_dir = Path(run_dir).resolve()
    record = read_run(run_dir)  # a bad RUN is named before torch is imported
    strategy = record["config"]["strategy"]["name"]
    if strategy in STRATEGIES and STRATEGIES[strategy].four_bit:
        raise TransferError(
            f"{run_dir}: strategy={strategy}'s adapter was trained on a 4-bit NF4 base, which this command does not "
            "rebuild; allowed: runs of the other strategies"
        )
    if base and which is not None:
        raise TransferError(f"--base with --weights {which}: the untrained model has no weights to pick; allowed: one")
    from transfer.objectives import build_objective
    from transfer.training.hardware import resolve

    cfg = run_config(record, run_dir)
    hardware = resolve(cfg.hardware)
    weights = UNTRAINED if base else pick_weights(record, run_dir, which)
    model, tokenizer = rebuild(cfg, weights)
    if base and hasattr(model, "peft_config"):
        model = model.unload()  # the base itself, not an adapter at its initial values
    model.to(hardware.device)
    template = getattr(build_objective(cfg, tokenizer), "template", "none")  # lm frames nothing
    described = describe_weights(record, weights)
    if base:  # export's wording of step 0 says "nothing to load", which reads oddly here
        described = f"{described.split(', strategy ')[0]}, untrained: the model the run started from (--base)"
    return Talker(model, tokenizer, template, hardware, described)


# ---------------------------------------------------------------- the batch form
def read_prompts(path: Path, system: str | None) -> list[list[dict]]:
    """Each prompt as the conversation it opens: a line of text, or a .jsonl row's prompt or messages."""
    from transfer.data.chat import parse_messages

    if not path.is_file():
        raise TransferError(f"--prompts {path}: no such file; allowed: a text file (one prompt a line) or a .jsonl")
    opening = [{"role": "system", "content": system}] if system else []
    conversations = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        if path.suffix != ".jsonl":
            conversations.append([*opening, {"role": "user", "content": line}])
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise TransferError(f"{where}: not JSON ({first_line(e)}); allowed: one JSON object a line") from None
        value = row.get("messages", row.get("prompt")) if isinstance(row, dict) else None
        if not isinstance(value, str | list):
            raise TransferError(f'{where}: allowed: {{"prompt": text}} or {{"messages": [{{role, content}}, ...]}}')
        messages = parse_messages(value, where)
        if messages[-1]["role"] != "user" or any(not isinstance(m["content"], str) for m in messages):
            raise TransferError(f"{where}: the conversation must end with a user's turn, every message with text")
        conversations.append([*opening, *messages] if messages[0]["role"] != "system" else messages)
    if not conversations:
        raise TransferError(f"--prompts {path}: no prompt in it")
    return conversations


def output_path(run_dir: Path, prompts: Path, base: bool, out: Path | None) -> Path:
    """--out as given (refused if it exists), else RUN/chat/<prompts' name>[-base].jsonl, numbered past taken names."""
    if out is not None:
        if out.exists() or out.is_symlink():
            raise TransferError(f"--out {out} exists; allowed: a new file (nothing is written over)")
        return out
    stem = prompts.stem + ("-base" if base else "")
    folder = run_dir / CHAT_FOLDER
    path, number = folder / f"{stem}.jsonl", 1
    while path.exists() or path.is_symlink():
        number += 1
        path = folder / f"{stem}-{number}.jsonl"
    return path


def write_new(path: Path, rows: list[dict]) -> None:
    """The rows, all or nothing, at a path that must not exist yet (a link fails where a rename would overwrite)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        os.link(tmp, path)
    except FileExistsError:
        raise TransferError(f"{path} appeared while generating; nothing was written over it") from None
    finally:
        tmp.unlink(missing_ok=True)


def batch(talker: Talker, conversations: list[list[dict]], settings: Settings, run_dir: Path, base: bool) -> list[dict]:
    rows = []
    for number, messages in enumerate(conversations, start=1):
        answer = talker.reply(messages, settings)
        rows.append({"prompt": messages[-1]["content"], "messages": messages, **answer,
                     "model": talker.described, "base": base, "run": str(run_dir),
                     "settings": vars(settings)})  # fmt: skip
        print(f"{number}/{len(conversations)}: {answer['prompt_tokens']} tokens in, {len(answer['completion_ids'])} "
              f"out ({answer['stopped']})", flush=True)  # fmt: skip
    return rows


# ---------------------------------------------------------------- the interactive form
def converse(talker: Talker, settings: Settings, system: str | None, read=input) -> list[dict]:
    """Turn after turn until /quit or the end of input; the history frames each turn. Returns the conversation."""
    from transformers import TextStreamer

    opening = [{"role": "system", "content": system}] if system else []
    messages = list(opening)
    while True:
        try:
            line = read("you> ")
        except EOFError:
            print()
            return messages
        if line.strip() == "/quit":
            return messages
        if line.strip() == "/reset":
            messages = list(opening)
            print("(history cleared)")
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        print("model> ", end="", flush=True)
        streamer = TextStreamer(talker.tokenizer, skip_prompt=True, skip_special_tokens=True)
        answer = talker.reply(messages, settings, streamer)
        if answer["stopped"] == "max_new_tokens":
            print(f"[cut at {settings.max_new_tokens} new tokens: --max-new-tokens]")
        messages.append({"role": "assistant", "content": answer["completion"]})


# ---------------------------------------------------------------- the command
def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m transfer.chat", description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a completed run's folder (it holds metrics.json and checkpoints/)")
    parser.add_argument("--base", action="store_true", help="answer with the model the run started from")
    parser.add_argument(
        "--weights", choices=("best", "last"), help="default: those of the run's final evaluation (eval.weights)"
    )
    parser.add_argument("--prompts", help="answer each prompt of this file (a line each, or .jsonl), write them out")
    parser.add_argument("--out", help="--prompts' output file (default: RUN/chat/<prompts' name>.jsonl)")
    parser.add_argument("--system", help="a system message opening each conversation")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="default 256")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; > 0 samples")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling's mass when sampling (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="the sampling's seed")
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1:
        parser.error(f"--max-new-tokens {args.max_new_tokens}: allowed: 1 or more")
    if not args.temperature >= 0:
        parser.error(f"--temperature {args.temperature}: allowed: 0 (greedy) or more")
    if not 0 < args.top_p <= 1:
        parser.error(f"--top-p {args.top_p}: allowed: more than 0, at most 1")
    if args.out and not args.prompts:
        parser.error("--out names --prompts' output: give --prompts FILE too")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    settings = Settings(args.max_new_tokens, args.temperature, args.top_p, args.seed)
    from transfer.export import quiet_libraries

    quiet_libraries()
    try:
        run_dir = Path(args.run).resolve()
        if args.prompts:  # the prompts and where they go are checked before the model loads
            conversations = read_prompts(Path(args.prompts), args.system)
            out = output_path(run_dir, Path(args.prompts), args.base, Path(args.out) if args.out else None)
        talker = load(run_dir, args.weights, args.base)
        print(f"{talker.described}; template {talker.template}; {settings.describe()}", flush=True)
        if not args.prompts:
            print("each line is your turn; /reset clears the history, /quit or Ctrl-D ends", flush=True)
            converse(talker, settings, args.system)
            return 0
        rows = batch(talker, conversations, settings, run_dir, args.base)
        write_new(out, rows)
        print(f"wrote {len(rows)} answers to {out}", flush=True)
    except TransferError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(reader_may_leave(main))

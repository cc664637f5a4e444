"""Examples for instruction fine-tuning: rows -> conversations -> text -> tokens and labels.

Formats (`dataset.format`; `auto` decides from the first row's fields; field names are the
dataset's `*_field` settings):
- `prompt_completion`: a prompt and a completion, strings or message lists;
- `alpaca`: `instruction`, an optional `input` (joined to the instruction by a blank line), `output`;
- `messages`: a list of {role, content}; ShareGPT's `conversations` ({from, value}) is read too;
- `pairs` (preference objectives): a prompt, a `chosen` and a `rejected` answer;
- `unpaired` (KTO): a prompt, a completion and a `label` saying whether it is desirable.

Templates (`objective.template`):
- `auto`: the tokenizer's chat template when it has one, else `plain`;
- `chat`: the tokenizer's chat template (`apply_chat_template`);
- `plain`, for tokenizers without one: "### System:\\n{system}\\n\\n" once, then per turn
  "### Instruction:\\n{user}\\n\\n### Response:\\n{assistant}<eos>\\n\\n";
- `none`: prompt and completion as they are, then <eos> (prompt_completion strings only).

The loss counts the assistant's text in every assistant turn and the token that ends a turn
(`<|im_end|>`, `<eos>`, ...: the model must learn to stop); `train_on_prompt` counts every token.
Tokens are matched to the text they came from through the tokenizer's offsets, so the mask is
exact whatever the template puts around a message.

Too long for `block_size`: the prompt loses its start first (the part nearest the answer
stays), then the response its end; or, with `objective.truncation=drop`, the example goes.
"""

from dataclasses import dataclass

from transfer.data.sequences import IGNORE
from transfer.errors import TransferError

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
         "bot": "assistant", "system": "system"}  # fmt: skip
_SENTINEL = "\u2063sentinel\u2063"


@dataclass
class Example:
    messages: list[dict]  # {role, content}, the last one the assistant's answer
    raw: tuple[str, str] | None = None  # (prompt, completion) as written, for template=none

    @property
    def answer(self) -> str:
        return self.raw[1] if self.raw else self.messages[-1]["content"]

    def with_answer(self, answer: str) -> "Example":
        raw = (self.raw[0], answer) if self.raw else None
        return Example([*self.messages[:-1], {"role": "assistant", "content": answer}], raw)


def detect_format(row: dict, cfg, where: str) -> str:
    if cfg.format.value != "auto":
        return cfg.format.value
    if isinstance(row.get(cfg.messages_field), list) or isinstance(row.get("conversations"), list):
        return "messages"
    if cfg.instruction_field in row and cfg.output_field in row:
        return "alpaca"
    if cfg.prompt_field in row and cfg.completion_field in row:
        return "prompt_completion"
    raise TransferError(
        f"{where}: cannot tell the format from the fields {sorted(row)}; set dataset.format "
        "(prompt_completion, alpaca, messages) and its *_field names"
    )


def to_example(row: dict, fmt: str, cfg, where: str) -> Example:
    """One row as a conversation ending in the assistant's answer."""
    if fmt == "alpaca":
        instruction, extra = row.get(cfg.instruction_field), row.get(cfg.input_field)
        user = f"{instruction}\n\n{extra}" if isinstance(extra, str) and extra.strip() else instruction
        return _checked([{"role": "user", "content": user}, {"role": "assistant", "content": row.get(cfg.output_field)}],
                        where)  # fmt: skip
    if fmt == "prompt_completion":
        prompt, completion = row.get(cfg.prompt_field), row.get(cfg.completion_field)
        if isinstance(prompt, str) and isinstance(completion, str):
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
            return Example(_checked(messages, where).messages, raw=(prompt, completion))
        return _checked([*_messages(prompt, where), *_messages(completion, where)], where)
    return _checked(_messages(row.get(cfg.messages_field, row.get("conversations")), where), where)


def to_pair(row: dict, cfg, where: str) -> tuple[Example, Example]:
    """A preference pair: the prompt answered with the chosen answer, and with the rejected one.

    The prompt and the answers are strings, or message lists (the answers' ending with the assistant's).
    """
    prompt = row.get(cfg.prompt_field)
    return tuple(_answered(prompt, row.get(field), where) for field in (cfg.chosen_field, cfg.rejected_field))


def to_unpaired(row: dict, cfg, where: str) -> tuple[Example, bool]:
    """KTO's unpaired row: the prompt answered with the completion, and whether that answer is desirable."""
    label = row.get(cfg.label_field or "label")
    if isinstance(label, str) and label.lower() in ("true", "false"):
        label = label.lower() == "true"
    if not isinstance(label, (bool, int)) or label not in (0, 1):
        raise TransferError(f"{where}: label {label!r} must say whether the completion is desirable: true or false")
    return _answered(row.get(cfg.prompt_field), row.get(cfg.completion_field), where), bool(label)


def _answered(prompt, answer, where: str) -> Example:
    if isinstance(prompt, str) and isinstance(answer, str):
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
        return Example(_checked(messages, where).messages, raw=(prompt, answer))
    answers = [{"role": "assistant", "content": answer}] if isinstance(answer, str) else _messages(answer, where)
    return _checked([*_messages(prompt, where), *answers], where)


def _messages(value, where: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list):
        raise TransferError(f"{where}: a conversation must be a list of messages, not {type(value).__name__}")
    out = []
    for m in value:
        role = ROLES.get(str(m.get("role", m.get("from", ""))).lower()) if isinstance(m, dict) else None
        if role is None:
            raise TransferError(f"{where}: message {m!r} has no role among {', '.join(ROLES)}")
        out.append({"role": role, "content": m.get("content", m.get("value"))})
    return out


def _checked(messages: list[dict], where: str) -> Example:
    if not messages or messages[-1]["role"] != "assistant":
        raise TransferError(f"{where}: the conversation does not end with the assistant's answer")
    bad = next((m for m in messages if not isinstance(m["content"], str)), None)
    if bad is not None:
        raise TransferError(f"{where}: a {bad['role']} message has no text (content {bad['content']!r})")
    return Example(messages)


def template_of(tokenizer, template: str) -> str:
    """The template an objective setting means for this tokenizer: chat, plain or none."""
    if template == "auto":
        return "chat" if getattr(tokenizer, "chat_template", None) else "plain"
    if template == "chat" and not getattr(tokenizer, "chat_template", None):
        raise TransferError(
            "objective.template=chat but this tokenizer has no chat template; allowed: auto, plain, none"
        )
    return template


def render(example: Example, tokenizer, template: str) -> tuple[str, list[tuple[int, int, int]]]:
    """The example's text, and for each assistant turn (start, end of its text, end of the turn) in it."""
    if template == "none":
        if example.raw is None:
            raise TransferError(
                "objective.template=none takes prompt and completion strings; this dataset has messages"
            )
        prompt, completion = example.raw
        text = prompt + completion + (tokenizer.eos_token or "")
        return text, [(len(prompt), len(prompt) + len(completion), len(text))]
    if template == "plain":
        return _plain(example.messages, tokenizer.eos_token or "")
    return _chat(example.messages, tokenizer)


def generation_prompt(example: Example, tokenizer, template: str) -> str:
    """The text a model continues to answer the example: everything up to the last assistant turn's text."""
    text, spans = render(example, tokenizer, template)
    return text[: spans[-1][0]]


def _plain(messages: list[dict], eos: str) -> tuple[str, list[tuple[int, int, int]]]:
    text, spans = "", []
    for m in messages:
        if m["role"] == "system":
            text += f"### System:\n{m['content']}\n\n"
        elif m["role"] == "user":
            text += f"### Instruction:\n{m['content']}\n\n### Response:\n"
        else:
            start = len(text)
            text += m["content"] + eos
            spans.append((start, start + len(m["content"]), len(text)))
            text += "\n\n"
    return text, spans


def _chat(messages: list[dict], tokenizer) -> tuple[str, list[tuple[int, int, int]]]:
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    end = _turn_end(tokenizer)
    spans, cursor = [], 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = text.find(m["content"], cursor)
        if i:  # where the template starts the assistant's turn, when its rendering is a prefix of the whole
            head = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
            if text.startswith(head) and text.startswith(m["content"], len(head)):
                start = len(head)
        if start < 0:
            raise TransferError("the chat template changes the assistant's text; use objective.template=plain")
        stop = start + len(m["content"])
        turn_end = stop + len(end) if end and text.startswith(end, stop) else stop
        spans.append((start, stop, turn_end))
        cursor = turn_end
    return text, spans


_TURN_ENDS: dict[int, str] = {}


def _turn_end(tokenizer) -> str:
    """What the chat template writes right after an assistant's text up to its first special token (<|im_end|>)."""
    key = id(tokenizer)
    if key not in _TURN_ENDS:
        probe = [{"role": "user", "content": "x"}, {"role": "assistant", "content": _SENTINEL}]
        after = tokenizer.apply_chat_template(probe, tokenize=False).split(_SENTINEL, 1)[-1]
        specials = sorted({t for t in tokenizer.all_special_tokens if t}, key=len, reverse=True)
        stripped = after.lstrip(" \n")
        token = next((t for t in specials if stripped.startswith(t)), None)
        _TURN_ENDS[key] = after[: len(after) - len(stripped) + len(token)] if token else ""
    return _TURN_ENDS[key]


def encode(text: str, ranges, tokenizer, template: str, everything: bool = False) -> tuple[list[int], list[int]]:
    """Token ids of the text, labelled where a token overlaps one of the (start, end) ranges, or everywhere."""
    # a chat template writes its own begin-of-text token; the others get the tokenizer's, as pretraining did
    # verbose=False: a text longer than the model's context is no mistake here; fit() cuts it to block_size
    enc = tokenizer(text, add_special_tokens=template != "chat", return_offsets_mapping=True, verbose=False)
    ids = enc["input_ids"]
    labels = [
        t if everything or any(a < end and b > start for start, end in ranges) else IGNORE
        for t, (a, b) in zip(ids, enc["offset_mapping"], strict=True)
    ]
    return ids, labels


def training_tokens(example: Example, tokenizer, template: str, train_on_prompt: bool):
    """Ids and labels to train on: every assistant turn's text and the token that ends it."""
    text, spans = render(example, tokenizer, template)
    return encode(text, [(start, end) for start, _, end in spans], tokenizer, template, train_on_prompt)


def answer_tokens(example: Example, answer: str, tokenizer, template: str):
    """Ids of the example answered with `answer`, labelled on that answer's text alone: what choice scoring sums."""
    text, spans = render(example.with_answer(answer), tokenizer, template)
    start, stop, _ = spans[-1]
    return encode(text, [(start, stop)], tokenizer, template)


def fit(ids: list[int], labels: list[int], block_size: int) -> tuple[list[int], list[int], str | None]:
    """Cut to block_size: the prompt's start first, then the response's end. Returns what was cut (None, prompt, response)."""
    if len(ids) <= block_size:
        return ids, labels, None
    first = next((i for i, label in enumerate(labels) if label != IGNORE), len(labels))
    cut = min(len(ids) - block_size, max(first - 1, 0))  # keep one token before the answer as its context
    ids, labels = ids[cut:], labels[cut:]
    if len(ids) <= block_size:
        return ids, labels, "prompt"
    return ids[:block_size], labels[:block_size], "response"


def fitted_examples(items, tokenizer, template: str, train_on_prompt: bool, block_size: int, drop: bool,
                    max_tokens: int | None) -> tuple[list[list[int]], list[list[int]], list, dict]:  # fmt: skip
    """fitted_tokens of each (example, extra) of `items`, in order, until the next kept one would pass max_tokens
    tokens in all: (ids, labels, the kept examples' extras, counts of what was cut or dropped). `items` may be a
    generator: nothing after the example that ends it is read."""
    counts = {"truncated_prompt": 0, "truncated_response": 0, "dropped_too_long": 0, "dropped_no_answer": 0}
    ids_list, labels_list, kept, total = [], [], [], 0
    for example, extra in items:
        tokens = fitted_tokens(example, tokenizer, template, train_on_prompt, block_size, drop, counts)
        if tokens is None:
            continue
        if max_tokens is not None and ids_list and total + len(tokens[0]) > max_tokens:
            break
        ids_list.append(tokens[0])
        labels_list.append(tokens[1])
        kept.append(extra)
        total += len(tokens[0])
    return ids_list, labels_list, kept, counts


def fitted_tokens(example: Example, tokenizer, template: str, train_on_prompt: bool, block_size: int, drop: bool,
                  counts: dict) -> tuple[list[int], list[int]] | None:  # fmt: skip
    """training_tokens cut to block_size by `fit`, or None for an example dropped; `counts` says what was cut or dropped."""
    ids, labels = training_tokens(example, tokenizer, template, train_on_prompt)
    if len(ids) > block_size and drop:
        counts["dropped_too_long"] += 1
        return None
    ids, labels, cut = fit(ids, labels, block_size)
    if cut:
        counts[f"truncated_{cut}"] += 1
    if all(label == IGNORE for label in labels[1:]):  # nothing left to learn from
        counts["dropped_no_answer"] += 1
        return None
    return ids, labels

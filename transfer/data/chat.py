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

from contextlib import contextmanager
from dataclasses import dataclass, field

from transfer.config.preflight import described
from transfer.data.sequences import IGNORE
from transfer.errors import TransferError, first_line

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
         "bot": "assistant", "system": "system"}  # fmt: skip


@dataclass
class Example:
    messages: list[dict]  # {role, content}, the last one the assistant's answer
    raw: tuple[str, str] | None = None  # (prompt, completion) as written, for template=none
    where: str | None = field(default=None, compare=False)  # the row it came from, for messages

    @property
    def answer(self) -> str:
        return self.raw[1] if self.raw else self.messages[-1]["content"]

    def with_answer(self, answer: str) -> "Example":
        raw = (self.raw[0], answer) if self.raw else None
        return Example([*self.messages[:-1], {"role": "assistant", "content": answer}], raw, self.where)


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
        instruction = _value(row, cfg.instruction_field, where, messages=False)
        output = _value(row, cfg.output_field, where, messages=False)
        extra = row.get(cfg.input_field)
        user = f"{instruction}\n\n{extra}" if isinstance(extra, str) and extra.strip() else instruction
        return _checked([{"role": "user", "content": user}, {"role": "assistant", "content": output}], where)
    if fmt == "prompt_completion":
        return _answered(_value(row, cfg.prompt_field, where), _value(row, cfg.completion_field, where), where)
    unset = row.get(cfg.messages_field) is None and row.get("conversations") is not None
    name = "conversations" if unset else cfg.messages_field
    value = row.get(name)
    if not isinstance(value, list):
        raise TransferError(f"{where}: {name!r} is {_said(value)}; allowed: a list of messages")
    return _checked(parse_messages(value, where), where)


def to_pair(row: dict, cfg, where: str) -> tuple[Example, Example]:
    """A preference pair: the prompt answered with the chosen answer, and with the rejected one.

    The prompt and the answers are strings, or message lists (the answers' ending with the assistant's).
    """
    prompt = _value(row, cfg.prompt_field, where)
    return tuple(_answered(prompt, _value(row, name, where), where) for name in (cfg.chosen_field, cfg.rejected_field))


def to_unpaired(row: dict, cfg, where: str) -> tuple[Example, bool]:
    """KTO's unpaired row: the prompt answered with the completion, and whether that answer is desirable."""
    name = cfg.label_field or "label"
    label = row.get(name)
    if isinstance(label, str) and label.strip().lower() in ("true", "false", "1", "0"):  # a CSV cell is text
        label = label.strip().lower() in ("true", "1")
    if not isinstance(label, (bool, int)) or label not in (0, 1):
        raise TransferError(
            f"{where}: {name!r} is {_said(label)}; allowed: true or false (whether the completion is desirable)"
        )
    answer = _answered(_value(row, cfg.prompt_field, where), _value(row, cfg.completion_field, where), where)
    return answer, bool(label)


def _value(row: dict, name: str, where: str, messages: bool = True):
    """A prompt's or an answer's field: text, or (`messages`) a list of messages."""
    value = row.get(name)
    if isinstance(value, str) or (messages and isinstance(value, list)):
        return value
    raise TransferError(
        f"{where}: {name!r} is {_said(value)}; allowed: {'text or a list of messages' if messages else 'text'}"
    )


def _said(value) -> str:
    # a row read by `datasets` holds every field of its file: a field it lacked reads as null
    return "missing or null" if value is None else described(value)


def _answered(prompt, answer, where: str) -> Example:
    if isinstance(prompt, str) and isinstance(answer, str):
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
        return Example(_checked(messages, where).messages, raw=(prompt, answer), where=where)
    answers = [{"role": "assistant", "content": answer}] if isinstance(answer, str) else parse_messages(answer, where)
    return _checked([*parse_messages(prompt, where), *answers], where)


def parse_messages(value, where: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list):
        raise TransferError(f"{where}: a conversation must be a list of messages, not {_said(value)}")
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
        raise TransferError(f"{where}: a {bad['role']} message has no text (content {_said(bad['content'])})")
    return Example(messages, where=where)


@contextmanager
def naming_the_row(example: Example):
    """A problem met rendering an example (a chat template that refuses it or does not parse, one that cannot be
    mapped: every template call goes through _apply_template, which makes it one line) also names the row the example
    came from: the rendering says what, this says where."""
    try:
        yield
    except TransferError as e:
        if example.where is None:
            raise
        raise TransferError(f"{example.where}: {e}") from None


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
    """The conversation through the chat template, and where each assistant turn's text is in it.

    Found by rendering, never by searching the text (an answer's words may be in the prompt too):
    the conversation is rendered again with each assistant text replaced by a marker, the text
    between markers is the template's own, and the answers fill the gaps as the template wrote them
    (whole, or trimmed, as Llama's and Gemma's templates do). A template whose rendering cannot be
    rebuilt so, to the character, is refused rather than guessed at.
    """
    text = _apply_template(tokenizer, messages)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    marks = {i: _marker(i, text) for i in turns}
    shape = _apply_template(
        tokenizer, [{**m, "content": marks[i]} if i in marks else m for i, m in enumerate(messages)]
    )
    pieces = _split_on(shape, [marks[i] for i in turns])
    if pieces is None:
        raise TransferError(
            "the chat template rewrites the assistant's text (it does not come out where it went in); "
            "allowed: objective.template=plain or none"
        )
    specials = sorted({t for t in tokenizer.all_special_tokens if t}, key=len, reverse=True)
    rebuilt, spans = pieces[0], []
    for number, i in enumerate(turns):
        after = pieces[number + 1]
        content = messages[i]["content"]
        written = next((c for c in dict.fromkeys((content, content.strip(), content.rstrip(), content.lstrip()))
                        if text.startswith(rebuilt + c + after)), None)  # fmt: skip
        if written is None:
            raise TransferError(
                f"the chat template changes the assistant's text of turn {number + 1} (not only its outer "
                "whitespace); allowed: objective.template=plain or none"
            )
        start = len(rebuilt)
        stop = start + len(written)
        # the turn ends with the template's first special token after the text (<|im_end|>, </s>, <end_of_turn>):
        # the model must learn to stop
        stripped = after.lstrip(" \n")
        token = next((t for t in specials if stripped.startswith(t)), None)
        turn_end = stop + len(after) - len(stripped) + len(token) if token else stop
        spans.append((start, stop, turn_end))
        rebuilt += written + after
    if rebuilt != text:
        raise TransferError("the chat template's rendering cannot be mapped to the messages; "
                            "allowed: objective.template=plain or none")  # fmt: skip
    return text, spans


def _marker(i: int, text: str) -> str:
    """A marker for assistant turn i that the rendered text does not hold: no whitespace at its ends (templates
    trim), no characters a template would escape."""
    mark = f"\u2063M{i}\u2063"
    while mark in text:
        mark = f"\u2063{mark}"
    return mark


def _split_on(shape: str, marks: list[str]) -> list[str] | None:
    """`shape` cut at each marker, in order, each found exactly once: the template's own text around the answers."""
    pieces, rest = [], shape
    for mark in marks:
        if shape.count(mark) != 1 or mark not in rest:
            return None
        before, rest = rest.split(mark, 1)
        pieces.append(before)
    return [*pieces, rest]


def _apply_template(tokenizer, messages: list[dict], **kwargs) -> str:
    """The tokenizer's chat template applied, its own refusals (roles that must alternate, a system message it does
    not take, a syntax error) reported in one line."""
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
    except Exception as e:  # jinja2's TemplateError and what a template raises itself
        roles = ", ".join(m["role"] for m in messages)
        raise TransferError(
            f"the tokenizer's chat template refused a conversation of roles [{roles}] ({type(e).__name__}: "
            f"{first_line(e)}); allowed: conversations the template takes, or objective.template=plain"
        ) from None


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
                    max_tokens: int | None, whole: list[int] | None = None,
                    ) -> tuple[list[list[int]], list[list[int]], list, dict]:  # fmt: skip
    """fitted_tokens of each (example, extra) of `items`, in order, until the next kept one would pass max_tokens
    tokens in all: (ids, labels, the kept examples' extras, counts of what was cut or dropped). `items` may be a
    generator: nothing after the example that ends it is read. `whole`, if given, gets each example's length before
    any cut."""
    counts = {"truncated_prompt": 0, "truncated_response": 0, "dropped_too_long": 0, "dropped_no_answer": 0}
    ids_list, labels_list, kept, total = [], [], [], 0
    for example, extra in items:
        tokens = fitted_tokens(example, tokenizer, template, train_on_prompt, block_size, drop, counts, whole)
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
                  counts: dict, whole: list[int] | None = None) -> tuple[list[int], list[int]] | None:  # fmt: skip
    """training_tokens cut to block_size by `fit`, or None for an example dropped; `counts` says what was cut or dropped,
    `whole` (if given) gets the length before the cut."""
    with naming_the_row(example):
        ids, labels = training_tokens(example, tokenizer, template, train_on_prompt)
    if whole is not None:
        whole.append(len(ids))
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

"""Answers are found in a chat template's text by rendering, whatever the template: the families users bring.

Each template is the published one of its family (ChatML as Qwen's; Llama-2's and Mistral's `[INST]`,
which put a space or nothing between prompt and answer and have no generation-prompt block;
Llama-3's headers; Zephyr's role tags; Gemma's turns), on the byte tokenizer, so that every
character is a token and the scored text can be read back exactly. Every conversation's answers
("Yes", "No") also appear in its prompts: a search of the text would find the prompt's words.
"""

import pytest

from transfer.data.chat import Example, answer_tokens, generation_prompt, render, training_tokens
from transfer.data.sequences import IGNORE
from transfer.errors import TransferError
from transfer.models.load import byte_tokenizer

RAISE = "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
TEMPLATES = {
    "chatml": (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
        ["<|im_start|>", "<|im_end|>"], "<|im_end|>",
    ),
    "llama2": (
        "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
        "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
        "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}" + RAISE + "{% endif %}"
        "{% if loop.index0 == 0 and system_message != false %}"
        "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
        "{% else %}{% set content = message['content'] %}{% endif %}"
        "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}",
        [], " </s>",
    ),
    "llama3": (
        "{% for message in messages %}{% set content = '<|start_header_id|>' + message['role'] + "
        "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
        "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}",
        ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], "<|eot_id|>",
    ),
    "zephyr": (
        "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + "
        "eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}"
        "\n{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
        "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}",
        [], "</s>",
    ),
    "mistral": (
        "{{ bos_token }}{% for message in messages %}"
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}" + RAISE + "{% endif %}"
        "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
        "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}",
        [], "</s>",
    ),
    "gemma": (
        "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        + RAISE + "{% endif %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}"
        "{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + "
        "'<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}",
        ["<start_of_turn>", "<end_of_turn>"], "<end_of_turn>",
    ),
}  # fmt: skip
CONVERSATION = [
    {"role": "user", "content": "Is Rust memory-safe? Answer Yes or No."},
    {"role": "assistant", "content": "Yes"},
    {"role": "user", "content": "Is C memory-safe? Answer Yes or No, and No means no."},
    {"role": "assistant", "content": "No"},
]


def tokenizer(family: str):
    template, specials, _ = TEMPLATES[family]
    tok = byte_tokenizer()
    tok.add_special_tokens({"bos_token": "<s>", "eos_token": "</s>", "additional_special_tokens": specials})
    tok.chat_template = template
    return tok


def scored(tok, ids, labels) -> str:
    return tok.decode([t for t, label in zip(ids, labels, strict=True) if label != IGNORE])


@pytest.mark.parametrize("family", TEMPLATES)
def test_each_answer_and_its_turn_end_are_scored_and_nothing_of_the_prompts(family):
    tok, end = tokenizer(family), TEMPLATES[family][2]
    text, spans = render(Example(CONVERSATION), tok, "chat")
    assert text == tok.apply_chat_template(CONVERSATION, tokenize=False)
    assert [text[a:b] for a, b, _ in spans] == ["Yes", "No"]
    assert [text[b:e] for _, b, e in spans] == [end, end]
    # the answers are the template's, not the prompts' words: the first "Yes" of the text is in the first prompt
    assert text.index("Yes") < spans[0][0] and text.index("No") < spans[1][0]
    ids, labels = training_tokens(Example(CONVERSATION), tok, "chat", train_on_prompt=False)
    assert scored(tok, ids, labels) == f"Yes{end}No{end}"
    assert sum(label != IGNORE for label in labels) == len(
        tok(f"Yes{end}No{end}", add_special_tokens=False)["input_ids"]
    )


@pytest.mark.parametrize("family", TEMPLATES)
def test_choice_scoring_sums_the_choice_at_the_answers_place(family):
    """What choice scoring labels is each choice itself, where the answer goes: after the last prompt, not in it."""
    tok = tokenizer(family)
    example = Example(CONVERSATION)
    prompt = generation_prompt(example, tok, "chat")
    for choice in ("Yes", "No"):
        ids, labels = answer_tokens(example, choice, tok, "chat")
        first = next(i for i, label in enumerate(labels) if label != IGNORE)
        assert scored(tok, ids, labels) == choice
        assert tok.decode(ids[:first]) == prompt.rstrip() or tok.decode(ids[:first]) == prompt


@pytest.mark.parametrize("family", ["llama2", "gemma"])
def test_an_answer_with_outer_whitespace_is_scored_as_the_template_trims_it(family):
    tok, end = tokenizer(family), TEMPLATES[family][2]
    padded = [CONVERSATION[0], {"role": "assistant", "content": "  Yes \n"}]
    text, spans = render(Example(padded), tok, "chat")
    assert [text[a:b] for a, b, _ in spans] == ["Yes"]
    ids, labels = training_tokens(Example(padded), tok, "chat", train_on_prompt=False)
    assert scored(tok, ids, labels) == f"Yes{end}"


def test_a_template_that_rewrites_the_answer_is_refused_in_one_line():
    tok = byte_tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] | upper }}\n{% endfor %}"
    with pytest.raises(TransferError, match="the chat template changes the assistant's text of turn 1") as e:
        render(Example(CONVERSATION[:2]), tok, "chat")
    assert "\n" not in str(e.value)


def test_a_template_that_refuses_the_conversation_says_so_in_one_line():
    tok = tokenizer("gemma")
    with pytest.raises(TransferError, match=r"chat template refused a conversation of roles \[system, user, assistant\]"
                       r" \(TemplateError: System role not supported\)") as e:  # fmt: skip
        render(Example([{"role": "system", "content": "Be brief."}, *CONVERSATION[:2]]), tok, "chat")
    assert "\n" not in str(e.value)


def test_choices_are_scored_as_the_data_writes_its_answers(tmp_path):
    """Completions written " Yes"/" No" (template none: the text as the model sees it) with dataset.choices=[Yes, No]:
    the choices are scored as " Yes" and " No", the tokens training scored, exactly as if the choices were
    written so; and a warning says so."""
    import json

    from transfer.config.compose import compose_config
    from transfer.models.load import load_model_and_tokenizer
    from transfer.objectives import build_objective
    from transfer.training.hardware import resolve

    for split, n in (("train", 8), ("validation", 6), ("test", 2)):
        rows = [{"prompt": f"Is {k} even? Answer:", "completion": " Yes" if k % 2 == 0 else " No"} for k in range(n)]
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    files = [f"dataset.{s}_files=[{tmp_path / f'{s}.jsonl'}]" for s in ("train", "validation", "test")]
    results, notes = {}, {}
    for written in ("[Yes,No]", "[' Yes',' No']"):
        cfg = compose_config(["objective=sft", "objective.template=none", "dataset=text_files", *files,
                              f"dataset.choices={written}", "block_size=64", "eval/probes=[]"])  # fmt: skip
        model, tok = load_model_and_tokenizer(cfg.model, cfg.block_size)
        objective = build_objective(cfg, tok)
        splits = objective.prepare(None)
        assert objective.scored_choices == [" Yes", " No"]
        notes[written] = objective.data_warnings()
        results[written] = objective.evaluate(model.eval(), splits["validation"], 4, resolve(cfg.hardware), "v")
    assert results["[Yes,No]"] == results["[' Yes',' No']"]
    assert notes["[' Yes',' No']"] == []
    assert notes["[Yes,No]"] == [
        "dataset.choices 'Yes' is written ' Yes' 8 times in the data's answers; choices are scored as training saw "
        "them most: ' Yes'",
        "dataset.choices 'No' is written ' No' 8 times in the data's answers; choices are scored as training saw "
        "them most: ' No'",
    ]

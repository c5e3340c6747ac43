"""Response-only masking through each family's chat-template format (Qwen's ChatML, Qwen3's empty
thinking block, Gemma 3's turns, Phi-3's, Mistral's [INST]): the batched path equals the
per-example reference token for token, and the trained tokens are exactly each assistant turn as
the template writes it, followed by the template's end of that turn (its end-of-turn token).

The templates are the families' own, reduced to string contents (no tools, no images); the
tokenizer is a small byte-level BPE trained here, with the families' special tokens added."""
from __future__ import annotations

import random

import pytest
from support import tiny_recipe_dict
from test_data_fast import _both, _jsonl, _same, _text, bpe_tokenizer  # noqa: F401 (the fixture)

from fastft import recipe
from fastft.data import IGNORE

QWEN25 = ("{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + "
          "'<|im_end|>\\n' }}{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a "
          "helpful assistant.<|im_end|>\\n' }}{%- endif %}{%- for m in messages %}{%- if m['role'] != 'system' %}"
          "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
          "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
# Qwen3: the last assistant turn after the last user turn opens with a (here empty) thinking block
QWEN3 = ("{%- set ns = namespace(last_query=messages|length - 1) %}{%- for m in messages[::-1] %}"
         "{%- set i = messages|length - 1 - loop.index0 %}{%- if m['role'] == 'user' and ns.last_query == messages|length - 1"
         " %}{%- set ns.last_query = i %}{%- endif %}{%- endfor %}"
         "{%- for m in messages %}{%- if m['role'] == 'system' or m['role'] == 'user' %}"
         "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
         "{%- elif m['role'] == 'assistant' %}{%- if loop.index0 > ns.last_query and loop.last %}"
         "{{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' + m['content'] + '<|im_end|>\\n' }}{%- else %}"
         "{{- '<|im_start|>assistant\\n' + m['content'] + '<|im_end|>\\n' }}{%- endif %}{%- endif %}{%- endfor %}"
         "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
GEMMA3 = ("{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}{%- set first = messages[0]['content'] + '\\n\\n' -%}"
          "{%- set loop_messages = messages[1:] -%}{%- else -%}{%- set first = '' -%}{%- set loop_messages = messages -%}"
          "{%- endif -%}{%- for m in loop_messages -%}{%- set role = 'model' if m['role'] == 'assistant' else m['role'] -%}"
          "{{ '<start_of_turn>' + role + '\\n' + (first if loop.first else '') }}{{ m['content'] | trim }}"
          "{{ '<end_of_turn>\\n' }}{%- endfor -%}{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}")
PHI3 = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ '<|system|>\\n' + m['content'] + '<|end|>\\n' }}"
        "{% elif m['role'] == 'user' %}{{ '<|user|>\\n' + m['content'] + '<|end|>\\n' }}"
        "{% elif m['role'] == 'assistant' %}{{ '<|assistant|>\\n' + m['content'] + '<|end|>\\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}")
# Mistral v0.3 (no system prompt: its template puts one only before the last user turn)
MISTRAL = ("{{- bos_token }}{%- for m in messages %}{%- if m['role'] == 'user' %}{{- '[INST] ' + m['content'] + '[/INST]' }}"
           "{%- elif m['role'] == 'assistant' %}{{- ' ' + m['content'] + eos_token }}{%- endif %}{%- endfor %}")

# template, what it writes after an assistant turn's content (trained with it: the model learns to
# end its turn), whether rows may carry a system prompt, the turn as the template writes it (content,
# whether it is the last turn)
FAMILIES = {
    "qwen2.5": (QWEN25, "<|im_end|>\n", True, lambda c, last: c),
    # the last turn's thinking block is the template's and part of the turn: trained, as in a
    # conversation of one turn, where the prefix renderings put it there too
    "qwen3": (QWEN3, "<|im_end|>\n", True, lambda c, last: "<think>\n\n</think>\n\n" + c if last else c),
    "gemma3": (GEMMA3, "<end_of_turn>\n", True, lambda c, last: c.strip()),
    "phi3": (PHI3, "<|end|>\n", True, lambda c, last: c),
    "mistral": (MISTRAL, "</s>", False, lambda c, last: " " + c),  # the space before a reply is the template's
}


def _rows(n: int, system: bool, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        msgs = [{"role": "system", "content": _text(rng, 5).strip()}] if system and rng.random() < 0.5 else []
        for _ in range(rng.randint(1, 3)):
            msgs.append({"role": "user", "content": _text(rng).strip() or "hi"})
            msgs.append({"role": "assistant", "content": _text(rng).strip() or "ok"})
        rows.append({"messages": msgs})
    return rows


def _runs(labels: list[int]) -> list[list[int]]:
    runs, cur = [], []
    for t in labels:
        if t == IGNORE:
            if cur:
                runs.append(cur)
            cur = []
        else:
            cur.append(t)
    return runs + ([cur] if cur else [])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_template_masks_exactly_the_assistant_turns(family, tmp_path, bpe_tokenizer):
    template, end, system, written = FAMILIES[family]
    tok = bpe_tokenizer
    saved = (tok.chat_template, tok.bos_token, tok.eos_token)
    specials = ["<start_of_turn>", "<end_of_turn>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>",
                "[INST]", "[/INST]", "<s>", "</s>"]
    tok.add_special_tokens({"additional_special_tokens": specials})
    tok.chat_template = template
    if family == "mistral":
        tok.bos_token, tok.eos_token = "<s>", "</s>"
    try:
        rows = _rows(60, system, seed=len(family))
        src = _jsonl(tmp_path / "chats.jsonl", rows)
        r = recipe.from_dict(tiny_recipe_dict(tmp_path / "o", model={"max_seq_length": 4096},
                                              data={"train": str(src), "format": "messages", "max_examples": None,
                                                    "eval_fraction": 0.0, "num_proc": 1}))
        fast, ref = _both(r, tok)
        _same(fast, ref)
        by_ids = {}
        for row in rows:  # the rendering identifies the row: the same ids, the same conversation
            text = tok.apply_chat_template(row["messages"], tokenize=False)
            by_ids[tuple(tok(text, add_special_tokens=False)["input_ids"])] = row
        assert len(fast.train) == len(rows)
        for ids, labels in zip(fast.train["input_ids"][:], fast.train["labels"][:]):
            row = by_ids[tuple(ids)]
            turns = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
            want = [written(c, k == len(turns) - 1) + end for k, c in enumerate(turns)]
            got = [tok.decode(run, skip_special_tokens=False) for run in _runs(labels)]
            assert got == want, (family, row)
    finally:
        tok.chat_template, tok.bos_token, tok.eos_token = saved


def test_a_template_neither_prefix_stable_nor_placeable_is_refused(bpe_tokenizer):
    """History rewritten (a marker on the last turn only) and contents changed (upper-cased): no
    rule finds the turns' tokens, and the error says what to change."""
    from fastft.data import DataError
    from fastft.data.per_example import tokenize

    tok = bpe_tokenizer
    saved = tok.chat_template
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if loop.last %}[last] {% endif %}"
                         "{{ m['content'] | upper }}<|im_end|>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    try:
        chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "one"},
                {"role": "user", "content": "again"}, {"role": "assistant", "content": "two"}]
        with pytest.raises(DataError, match="does not render turns as prefixes of the whole conversation"):
            tokenize(chat, tok, True)
    finally:
        tok.chat_template = saved

"""Generation: the one loop behind eval's answers, export's reference answers and `fastft generate`.

    from fastft import generate
    chats = [[{"role": "user", "content": "What is 12 + 7?"}]]
    answers = generate.greedy(model, tokenizer, chats, max_new_tokens=16)   # or prompts as token ids
    answers[0]["text"], answers[0]["ids"], answers[0]["stopped"]
    generate.reply(model, tokenizer, chats[0], temperature=0.7)            # streamed to stdout

A prompt is a chat (a list of messages ending before the assistant turn: rendered with the chat
template and its generation prompt), a text to continue (``[{"role": "completion", "content": text}]``:
``<bos>`` and the text's tokens, no template; how a base model is asked) or a list of token ids. Batches are padded on the left, so every
row continues from its last prompt token. Generation ends at a stop token: the tokenizer's EOS unless
``stop_ids`` names others (a generation config's eos ids). An answer's ids end at the first stop
token, which is kept; its text is decoded without it and without special tokens.
"""
from __future__ import annotations

from .data.formats import COMPLETION, END_OF_TURN


def render(tokenizer, messages: list[dict]) -> tuple[str, list[int]]:
    """The prompt text (chat template with the generation prompt) and its token ids."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        text = "\n".join(m["content"] for m in messages) + "\n"
    return text, tokenizer(text, add_special_tokens=False)["input_ids"]


def completion_ids(tokenizer, text: str) -> list[int]:
    """A text to continue as token ids: the tokenizer's bos (when it has one) and the text's tokens."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids if tokenizer.bos_token_id is None else [tokenizer.bos_token_id] + ids


def _prompt_ids(tokenizer, prompt: list) -> list[int]:
    if not prompt or not isinstance(prompt[0], dict):
        return list(prompt)
    if prompt[0]["role"] == COMPLETION:
        return completion_ids(tokenizer, prompt[0]["content"])
    return render(tokenizer, prompt)[1]


def _stops(tokenizer, stop_ids: list[int] | None) -> list[int]:
    """Token ids that end an answer: ``stop_ids`` when given, else the eos and every end-of-turn
    token the tokenizer's chat template writes: where one is not the eos (Gemma's <end_of_turn>, a
    base model's eos with an instruct template), generation must stop there too."""
    if stop_ids:
        return list(stop_ids)
    out = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    markers = [m for m in END_OF_TURN if m in template]
    if markers:
        vocab = tokenizer.get_vocab()
        out += [vocab[m] for m in markers if m in vocab and vocab[m] not in out]
    return out


def _answer(tokenizer, new: list[int], stops: list[int]) -> dict:
    stop = next((j for j, t in enumerate(new) if t in stops), None)
    kept = new if stop is None else new[:stop + 1]
    text = tokenizer.decode(kept if stop is None else kept[:-1], skip_special_tokens=True)
    return {"ids": kept, "text": text, "stopped": stop is not None}


def _continue(model, tokenizer, prompts: list[list[int]], stops: list[int], max_new_tokens: int,
              **options) -> list[list[int]]:
    """The new token ids after each prompt (left-padded into one batch), from ``model.generate``."""
    import torch

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stops[0] if stops else None)
    width = max(len(p) for p in prompts)
    device = next(model.parameters()).device
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    if getattr(getattr(model, "config", None), "output_router_logits", False):
        # a mixture-of-experts model trained with its router's load-balancing loss: that loss is
        # for training, and under generation's KV cache it would be computed from one step's
        # router logits against the whole attention mask (a shape error in transformers' MoE models)
        options = {"output_router_logits": False, **options}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, pad_token_id=pad,
                                 eos_token_id=stops or None, **options)
    finally:
        model.train(was_training)
    return out[:, width:].tolist()


def greedy(model, tokenizer, prompts: list[list], max_new_tokens: int = 16, stop_ids: list[int] | None = None,
           batch_size: int = 32, progress=None) -> list[dict]:
    """Greedy answers, ``{"ids", "text", "stopped"}`` per prompt, in batches of ``batch_size``.
    ``progress``: a fastft.progress bar, advanced by the prompts of each finished batch."""
    stops = _stops(tokenizer, stop_ids)
    out: list[dict] = []
    for i in range(0, len(prompts), batch_size):
        chunk = [_prompt_ids(tokenizer, p) for p in prompts[i:i + batch_size]]
        out += [_answer(tokenizer, new, stops)
                for new in _continue(model, tokenizer, chunk, stops, max_new_tokens, do_sample=False)]
        if progress is not None:
            progress.update(len(chunk))
    return out


def reply(model, tokenizer, messages: list[dict], max_new_tokens: int = 256, temperature: float = 0.0,
          adapter: bool = True) -> str:
    """Print the reply to ``messages`` to stdout as it is generated; returns its text. Greedy at
    temperature 0, sampling above. ``adapter=False``: a PEFT model's base alone."""
    import contextlib

    from transformers import TextStreamer

    stops = _stops(tokenizer, None)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    with contextlib.nullcontext() if adapter else model.disable_adapter():
        new = _continue(model, tokenizer, [_prompt_ids(tokenizer, messages)], stops, max_new_tokens,
                        streamer=streamer, **sampling)[0]
    return _answer(tokenizer, new, stops)["text"]

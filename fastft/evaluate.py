"""Held-out scoring: loss on the eval split and exact-match accuracy of greedy answers.

    from fastft import evaluate
    acc = evaluate.exact_match(model, tokenizer, bundle.eval_pairs[:100])
    acc["exact_match"]   # fraction of prompts whose greedy answer equals the reference

Answers and references are compared after ``normalize`` (case, surrounding whitespace and
repeated spaces), so a word-level tokenizer's spacing does not count as a wrong answer.
"""
from __future__ import annotations

import re


def normalize(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def generate_answers(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int = 16,
                     batch_size: int = 32) -> list[str]:
    """Greedy answers for chat prompts (each a list of messages ending before the assistant turn)."""
    import torch

    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # decoder-only generation continues from the right edge
    device = next(p for p in model.parameters()).device
    answers: list[str] = []
    try:
        for i in range(0, len(prompts), batch_size):
            texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
                     for p in prompts[i:i + batch_size]]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            with torch.no_grad():
                out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            new = out[:, enc["input_ids"].shape[1]:]
            answers += tokenizer.batch_decode(new, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return answers


def exact_match(model, tokenizer, pairs: list[tuple[list[dict], str]], max_new_tokens: int = 16) -> dict:
    """{"exact_match": fraction, "n": count, "examples": first few (prompt, answer, reference)}."""
    if not pairs:
        return {"exact_match": None, "n": 0, "examples": []}
    answers = generate_answers(model, tokenizer, [p for p, _ in pairs], max_new_tokens)
    hits = [normalize(a) == normalize(ref) for a, (_, ref) in zip(answers, pairs)]
    examples = [{"prompt": p[-1]["content"], "answer": a.strip(), "reference": ref}
                for a, (p, ref) in list(zip(answers, pairs))[:5]]
    return {"exact_match": sum(hits) / len(hits), "n": len(hits), "examples": examples}

"""One row of a data file as chat messages (formats alpaca, messages, sharegpt) or plain text (text).

    to_messages({"instruction": "Sum?", "input": "2 3", "output": "5"}, "alpaca", "f.jsonl row 1")
    # -> [{"role": "user", "content": "Sum?\\n\\n2 3"}, {"role": "assistant", "content": "5"}]
"""
from __future__ import annotations

from .bundle import DataError

ROLES = ("system", "user", "assistant")
# the tokens that end an assistant turn in the families' chat templates (Llama 3, ChatML for Qwen
# and SmolLM2, Gemma, Phi-3, gpt-oss)
# A base model is asked by continuing text, not through a chat template: an evaluation row with
# ``prompt`` and ``completion`` (plain strings) becomes the one message [{"role": COMPLETION, ...}],
# whose prompt ids are <bos> + the text's tokens (fastft.generate.prompt_ids).
COMPLETION = "completion"
END_OF_TURN = ("<|eot_id|>", "<|im_end|>", "<end_of_turn>", "<|end|>", "<|return|>")
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}

# format: (column, role key, content key, role names -> roles, allowed in the role error, no-assistant error)
_CHAT_FORMATS = {
    "messages": ("messages", "role", "content", {r: r for r in ROLES}, "allowed roles: " + ", ".join(ROLES),
                 "no assistant message"),
    "sharegpt": ("conversations", "from", "value", SHAREGPT_ROLES, "allowed: human, gpt, system (or user, assistant)",
                 "no gpt turn"),
}


def _turns(row: dict, fmt: str, where: str, cols: str) -> list[dict]:
    """A ``messages`` or ``sharegpt`` row: its list of turns -> [{role, content}]."""
    col, role_key, content_key, roles, allowed, no_assistant = _CHAT_FORMATS[fmt]
    turns = row.get(col)
    if turns is None:
        raise DataError(f"{where}: missing column {col!r} (format {fmt} needs a list of {{{role_key}, {content_key}}}; "
                        f"found {cols})")
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: {col!r} must be a non-empty list of {{{role_key}, {content_key}}}")
    out = []
    for i, m in enumerate(turns):
        if not isinstance(m, dict) or role_key not in m or content_key not in m:
            raise DataError(f"{where}: {col}[{i}] must be an object with {role_key!r} and {content_key!r}")
        role = roles.get(m[role_key]) if isinstance(m[role_key], str) else None
        if role is None:
            raise DataError(f"{where}: {col}[{i}] has {role_key} {m[role_key]!r}; {allowed}")
        if not isinstance(m[content_key], str):
            raise DataError(f"{where}: {col}[{i}].{content_key} must be text, got {type(m[content_key]).__name__}")
        out.append({"role": role, "content": m[content_key]})
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{where}: {no_assistant} (nothing to learn from this conversation)")
    return out


def to_messages(row: dict, fmt: str, where: str, text_field: str = "text") -> list[dict] | str:
    """One row as chat messages (alpaca, messages, sharegpt) or as plain text (text). ``where`` names
    the row."""
    cols = ", ".join(sorted(row)) or "none"
    if fmt == "alpaca":
        for col in ("instruction", "output"):
            if col not in row or row[col] is None:
                raise DataError(f"{where}: missing column {col!r} (format alpaca needs instruction, output and "
                                f"optionally input; found {cols})")
            if not isinstance(row[col], str):
                raise DataError(f"{where}: column {col!r} must be text, got {type(row[col]).__name__}")
        if not row["output"].strip():
            raise DataError(f"{where}: empty 'output' (nothing to learn from this row; remove it)")
        prompt = row["instruction"].strip()
        extra = row.get("input") or ""
        if not isinstance(extra, str):
            raise DataError(f"{where}: column 'input' must be text, got {type(extra).__name__}")
        if extra.strip():
            prompt = f"{prompt}\n\n{extra.strip()}"
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"].strip()}]
    if fmt in _CHAT_FORMATS:
        return _turns(row, fmt, where, cols)
    if fmt == "text":
        text = row.get(text_field)
        if not isinstance(text, str):
            raise DataError(f"{where}: missing text column {text_field!r} (data.text_field; found {cols})")
        if not text.strip():
            raise DataError(f"{where}: empty {text_field!r}")
        return text
    raise DataError(f"unknown data.format {fmt!r}")

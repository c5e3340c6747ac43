"""The chat template: rendering a conversation, finding each assistant turn's characters in the
rendering (the spans its labels cover), and checking on probe conversations that labelling those
spans in one batched tokenization is exact for this tokenizer and template (``template_check``).

    use(tokenizer)                 # before the worker pool forks: the workers inherit the template
    full = render(messages)
    spans(messages, full)          # [(start, end)] per assistant turn, or None

A turn's span runs from the end of the conversation before it rendered with the generation prompt
to the end of the conversation up to it. Those prefixes are rendered once per conversation shape
(its roles) with placeholder contents (``_shape``); an example uses them when the shape with its
contents put back is its own rendering, checked each time, and renders its prefixes itself
otherwise (``spans_rendered``).
"""
from __future__ import annotations

from .per_example import SLOT as _SLOT, slot_pieces as pieces, tokenize

_T: dict = {}  # set by use() before the pool forks: tokenizer, compiled template + kwargs, shapes rendered


def use(tokenizer) -> None:
    """Render with ``tokenizer``'s chat template from now on: its compiled Jinja template called
    directly where this transformers has the compiler, else ``apply_chat_template``."""
    _T.clear()
    _T["tokenizer"] = tokenizer
    _T["shapes"] = {}  # _shape's renderings belong to one template
    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str):
        return
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template
    except ImportError:  # another transformers: apply_chat_template, a little slower
        return
    _T["template_kwargs"] = dict(tokenizer.special_tokens_map)
    _T["compiled"] = _compile_jinja_template(template)


def render(ex, gen: bool = False) -> str:
    """The chat template's text for ``ex``: the compiled template called directly, with the
    arguments ``apply_chat_template`` passes it (checked against it by the template check)."""
    compiled = _T.get("compiled")
    if compiled is None:
        return _T["tokenizer"].apply_chat_template(ex, tokenize=False, add_generation_prompt=gen)
    return compiled.render(messages=ex, tools=None, documents=None, add_generation_prompt=gen, **_T["template_kwargs"])


# --- token boundaries ----------------------------------------------------------------------------

def _boundary(offsets, n: int, c: int) -> int | None:
    """The index of the first token at character ``c`` when a token boundary falls exactly there."""
    lo, hi = 0, n
    while lo < hi:  # first token whose start >= c
        mid = (lo + hi) // 2
        if offsets[mid][0] < c:
            lo = mid + 1
        else:
            hi = mid
    if lo < n and offsets[lo][0] != c:
        return None
    if lo > 0 and offsets[lo - 1][1] > c:
        return None
    return lo


def token_at(enc, n: int, c: int) -> int | None:
    """``_boundary`` of the encoding's offsets without building the offsets list (a list of tuples
    per token costs about a tenth of the tokenization): the token holding character ``c`` and the
    one before it are asked for their spans, which decides the common case; anything else (no
    token holds ``c``, tokens sharing characters) asks ``_boundary``."""
    t = enc.char_to_token(c)
    if t is not None and enc.token_to_chars(t)[0] == c:
        if t == 0:
            return 0
        a, b = enc.token_to_chars(t - 1)
        if a < c and b <= c:  # starts ascend, so token t is the first that starts at or after c
            return t
    return _boundary(enc.offsets, n, c)


# --- assistant spans -----------------------------------------------------------------------------


def _shape(roles: tuple) -> tuple | None:
    """The template's rendering of a conversation with these roles and placeholder contents: (the
    full rendering as pieces, a str for template text and an int for message k's content; per
    assistant turn, the template characters and the contents before the end of its head (the
    conversation before it, with the generation prompt) and of its end (the conversation up to
    it)). None when the template renders the placeholders in a way the pieces cannot describe."""
    ex = [{"role": r, "content": _SLOT.format(k)} for k, r in enumerate(roles)]

    def prefix(text: str, full: str) -> tuple | None:
        if not full.startswith(text) or (p := pieces(text)) is None:
            return None
        return (sum(len(x) for x in p if isinstance(x, str)), tuple(x for x in p if isinstance(x, int)))

    try:
        full = render(ex)
        whole = pieces(full)
        turns = []
        for i, r in enumerate(roles):
            if r != "assistant":
                continue
            head_text = render(ex[:i], gen=True)
            upto_text = full if i == len(ex) - 1 else render(ex[: i + 1])
            head, upto = prefix(head_text, full), prefix(upto_text, full)
            if head is None or upto is None or len(head_text) > len(upto_text):
                return None  # both are prefixes of full: the shorter one is a prefix of the longer
            turns.append((head, upto))
    except Exception:  # noqa: BLE001 - a shape the template rejects: each row is rendered as it is
        return None
    return None if whole is None else (whole, turns)


def _spans_by_shape(ex: list, full: str) -> list | None:
    """Each assistant turn's (start, end) characters in ``full`` from the rendering of the
    conversation's shape (``_shape``, rendered once per shape): exact when the shape's pieces with
    this conversation's contents put back are ``full`` itself, which is checked; None otherwise."""
    shapes = _T.setdefault("shapes", {})
    roles = tuple(m["role"] for m in ex)
    shape = shapes.get(roles, False)
    if shape is False:
        shape = shapes[roles] = _shape(roles)
    if shape is None:
        return None
    whole, turns = shape
    contents = [m["content"] for m in ex]
    if "".join(x if isinstance(x, str) else contents[x] for x in whole) != full:
        return None  # the template changes a content (trims it, branches on it): render the prefixes
    size = lambda part: part[0] + sum(len(contents[k]) for k in part[1])
    return [(size(head), size(upto)) for head, upto in turns]


def spans_rendered(ex: list, full: str) -> list | None:
    """Each assistant turn's (start, end) characters in ``full`` by rendering the conversation up to
    it with the generation prompt (start) and up to its end (end); None when those renderings are
    not prefixes of ``full``."""
    sp = []
    for i, msg in enumerate(ex):
        if msg["role"] != "assistant":
            continue
        head = render(ex[:i], gen=True)
        upto = full if i == len(ex) - 1 else render(ex[: i + 1])
        if not (full.startswith(upto) and upto.startswith(head)):
            return None
        sp.append((len(head), len(upto)))
    return sp


def spans(ex: list, full: str) -> list | None:
    """Each assistant turn's (start, end) characters in ``full`` (``ex`` rendered): from its shape
    where that is exact, else from its own prefix renderings; None when neither is a prefix."""
    sp = _spans_by_shape(ex, full)
    return sp if sp is not None else spans_rendered(ex, full)


# --- the template check --------------------------------------------------------------------------

def _probes() -> list:
    sys_ = {"role": "system", "content": "You answer briefly. Réponds en français si on te parle français."}
    u = lambda c: {"role": "user", "content": c}
    a = lambda c: {"role": "assistant", "content": c}
    return [
        [u("Classify: red, blue."), a("color")],
        [sys_, u("Wie heißt die Hauptstadt von Frankreich?"), a("Paris."), u("Und von Japan? 日本"), a("東京 (Tokyo).")],
        [u("two\n\nlines  with   spaces"), a(" leading space and trailing newline\n"), u("ok?"), a("yes")],
        [sys_, u("numbers 12345 and emoji 🙂"), a("1 2 3 4 5 🙂"), u("more"), a("done."), u("again"), a("x")],
        [u("code:\n```py\nprint('hi')\n```"), a("```py\nprint('hi')  # prints hi\n```")],
    ]


def template_check(tokenizer, responses_only: bool, encode_batch) -> str | None:
    """Why the batched path is not exact for this tokenizer and template (None: it is), by tokenizing
    probe conversations both ways: ``encode_batch`` (a list of examples -> (input_ids, labels) or
    None each) against the per-example method. Renders with ``tokenizer`` from then on (``use``),
    through ``apply_chat_template`` where the direct call renders a probe differently."""
    if getattr(tokenizer, "backend_tokenizer", None) is None:
        return "the tokenizer has no Rust backend (a slow tokenizer)"
    use(tokenizer)
    texts = ["plain text, with numbers 12345 and ünïcödé 日本語", "  leading spaces\nand\n\nnewlines "]
    for t in texts:
        if tokenizer.backend_tokenizer.encode(t, add_special_tokens=False).ids != tokenizer(
                t, add_special_tokens=False)["input_ids"]:
            return "the Rust tokenizer and the transformers tokenizer disagree on a probe text"
    if not getattr(tokenizer, "chat_template", None):
        return None
    for k, ex in enumerate(_probes()):
        try:
            if _T.get("compiled") is not None and any(
                    render(ex[:j], gen) != tokenizer.apply_chat_template(ex[:j], tokenize=False, add_generation_prompt=gen)
                    for j in (len(ex) - 1, len(ex)) for gen in (False, True)):
                _T.pop("compiled")  # the direct call renders differently: use apply_chat_template
                _T["shapes"] = {}
            want = tokenize(ex, tokenizer, responses_only)
            got = encode_batch([ex])[0]
        except Exception:  # noqa: BLE001 - a template that rejects a probe (no system role, ...) says nothing
            got = None
        if got is not None and (list(got[0]), list(got[1])) != (want["input_ids"], want["labels"]):
            return f"probe conversation {k} tokenizes differently when batched than one turn at a time"
    return None

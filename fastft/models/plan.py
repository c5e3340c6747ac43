"""VRAM planner: will this recipe fit on that GPU? Answered from the model config alone.

    fastft plan recipes/llama3-8b-qlora-alpaca-rtx4090.yaml
    fastft plan recipes/llama3-8b-qlora-alpaca-rtx4090.yaml --target a100-40 --set model.max_seq_length=4096

    from fastft import recipe
    from fastft.models import plan
    p = plan.plan(recipe.load("recipes/llama3-8b-qlora-chat.yaml"), target="rtx4090")
    p.total_bytes, p.fits, p.max_seq_length, p.max_batch_size

The model is built on PyTorch's ``meta`` device (shapes, no weights, no download; ``fastft.models.shapes``),
so planning an 8B recipe takes seconds on a laptop. Where the config comes from: a local checkpoint
folder's config.json, the embedded ``fastft-tiny``, or ``fastft.models.shapes.HUB_CONFIGS``, which maps the
usual hub ids to the public configs shipped in fastft/assets/configs (as do fastft.models.named's
``synthetic:<arch>`` names).

The memory model (every term, what is measured and what is assumed) is ``fastft.models.vram``'s.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..hardware import GiB, TARGETS
from ..recipe import Recipe
from ..schema import STRATEGIES
from ..world import split_batch
from .shapes import IMAGE_TEXT, PlanError, Shapes, find_config, parameter_lora, shapes
from .vram import (ALLOCATOR_SLACK, CONTEXT_HEADROOM, Term, adapted, block_bytes, fsdp_static, layer_activation_bytes,
                   logits_bytes, method_terms, nf4_bytes, optimizer_bytes, train_peak)


@dataclass
class Plan:
    model: str
    config_source: str
    target: str
    backend: str
    dtype: str
    batch_size: int
    max_seq_length: int
    static: list[Term]
    train: list[Term]
    eval: list[Term]
    slack: Term
    budget_bytes: int
    shapes: Shapes
    lora_params: int = 0
    max_seq_length_fit: int | None = None
    max_batch_size_fit: int | None = None
    notes: list[str] = field(default_factory=list)
    gpus: int = 1  # --gpus: the figures are per GPU (per rank)
    strategy: str = "single"  # single | ddp | fsdp (fastft.distributed)

    @property
    def static_bytes(self) -> float:
        return sum(t.bytes for t in self.static if t.counted)

    @property
    def train_bytes(self) -> float:
        return train_peak(self.train)

    @property
    def eval_bytes(self) -> float:
        return sum(t.bytes for t in self.eval)

    @property
    def total_bytes(self) -> float:
        return self.static_bytes + max(self.train_bytes, self.eval_bytes) + self.slack.bytes

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.budget_bytes

    def to_dict(self) -> dict:
        row = lambda t: {"name": t.name, "bytes": int(t.bytes), "counted": t.counted, "note": t.note}  # noqa: E731
        return {"model": self.model, "config": self.config_source, "target": self.target, "backend": self.backend,
                "dtype": self.dtype, "batch_size": self.batch_size, "max_seq_length": self.max_seq_length,
                "total_params": self.shapes.total_params, "lora_params": self.lora_params,
                "static": [row(t) for t in self.static], "train": [row(t) for t in self.train],
                "eval": [row(t) for t in self.eval], "allocator_slack": row(self.slack),
                "total_bytes": int(self.total_bytes), "budget_bytes": self.budget_bytes, "fits": self.fits,
                "max_seq_length_fit": self.max_seq_length_fit, "max_batch_size_fit": self.max_batch_size_fit,
                "notes": self.notes, "gpus": self.gpus, "strategy": self.strategy}


def planned_backend(recipe: Recipe) -> tuple[str, str]:
    if recipe.backend != "auto":
        return recipe.backend, f"backend: {recipe.backend} in the recipe"
    return "unsloth", "auto on a CUDA machine with fastft[gpu] installed"


def _dtype_bytes(recipe: Recipe) -> tuple[str, int]:
    d = recipe.model.dtype
    if d == "auto":
        return "bfloat16", 2  # every target (sm_80, sm_89, sm_90) has bf16
    return d, {"float32": 4, "float16": 2, "bfloat16": 2}[d]


def plan(recipe: Recipe, target: str = "rtx4090", search: bool = True, gpus: int = 1,
         strategy: str | None = None) -> Plan:
    """The peak-VRAM plan of ``recipe`` on ``target`` (a name in fastft.hardware.TARGETS). With
    ``gpus`` > 1 the figures are one rank's: ``strategy`` ddp or fsdp (None: the recipe's
    ``distributed.strategy``), the recipe's global batch split as fastft.train splits it."""
    if target not in TARGETS or TARGETS[target].memory_bytes is None:
        gpus = ", ".join(n for n, t in TARGETS.items() if t.memory_bytes)
        raise PlanError(f"--target: unknown GPU target {target!r}; choose one of {gpus}")
    recipe_dir = str(Path(recipe.source).resolve().parent) if recipe.source else None
    config, source = find_config(recipe.model.name, recipe_dir)
    sh = shapes(config)
    wrapped = parameter_lora(config, recipe.lora.target_modules)
    dist, batch = _distributed(recipe, gpus, strategy)
    p = _plan(recipe, target, sh, source, batch, recipe.model.max_seq_length, dist=dist, wrapped=wrapped)
    if search:
        p.max_seq_length_fit = _largest(lambda t: _plan(recipe, target, sh, source, p.batch_size, t, dist=dist,
                                                        wrapped=wrapped).fits, 256, max(sh.max_positions, 256), 256)
        p.max_batch_size_fit = _largest(lambda b: _plan(recipe, target, sh, source, b, p.max_seq_length,
                                                        dist=dist, wrapped=wrapped).fits, 1, 4096, 1)
    return p


def _largest(fits, lo: int, hi: int, step: int) -> int | None:
    """Largest multiple of ``step`` in [lo, hi] for which the (monotone) ``fits`` holds; None if none."""
    if not fits(lo):
        return None
    a, b = lo // step, hi // step
    while a < b:
        m = (a + b + 1) // 2
        a, b = (m, b) if fits(m * step) else (a, m - 1)
    return a * step


def _plan(recipe: Recipe, target: str, sh: Shapes, source: str, batch: int, seq: int,
          dist: tuple[int, str] = (1, "single"), wrapped: tuple[int, ...] = ()) -> Plan:
    """``wrapped``: shapes.parameter_lora's tensors (at r=1) on the weights that are not nn.Linear."""
    backend, why = planned_backend(recipe)
    if dist[0] > 1:  # as fastft.models.backends.choose: Unsloth trains on one GPU
        backend, why = "hf", f"{dist[0]} processes: Unsloth trains on a single GPU, so hf ({dist[1]})"
    dtype, s = _dtype_bytes(recipe)
    q4 = recipe.model.load_in_4bit
    lora, t = recipe.lora, recipe.train
    adapter_elem = 2 if dtype == "bfloat16" else 4
    # residual stream: hf + 4-bit runs it in fp32 (prepare_model_for_kbit_training upcasts embeddings)
    a = 4 if (backend == "hf" and q4) else s
    if backend == "unsloth" and lora.use_dora:
        a = s
    n = batch * seq
    if t.method in ("dpo", "orpo"):  # chosen and rejected go through one forward: two rows per pair
        n *= 2
    elif t.method == "grpo":  # a training row is the prompt plus a sampled answer
        n = batch * (seq + t.max_completion_length)
    budget = TARGETS[target].memory_bytes - CONTEXT_HEADROOM

    # static
    base_numels = [i * o for _, i, o in sh.linears]
    if q4:
        base = Term("base weights, 4-bit NF4", sum(nf4_bytes(x) for x in base_numels),
                    f"{sum(base_numels):,} params, 0.516 B each with double-quantized absmax")
    else:
        base = Term("base weights, 16-bit", sum(block_bytes(x * s) for x in base_numels), f"{sum(base_numels):,} params")
    w16 = 4 if (backend == "hf" and q4) else s
    n16 = sh.embed_params + sh.lm_head_params + sum(sh.small16)
    biases = sum(sh.small16) > sh.norm_params
    parts16 = Term("embeddings, LM head, norms" + (", biases" if biases else ""),
                   block_bytes(sh.embed_params * w16) + block_bytes(sh.lm_head_params * w16)
                   + sum(block_bytes(n * w16) for n in sh.small16),
                   f"{n16:,} params x {w16} B" + (" (PEFT upcasts them to fp32)" if w16 == 4 and s == 2 else "")
                   + (", LM head tied" if sh.tied else ""))
    targets = adapted(sh, lora.target_modules)
    tensors = []
    for _, i, o in targets:
        tensors += [lora.r * i, lora.r * o] + ([o] if lora.use_dora else [])
    n_linear = sum(tensors)
    tensors += [lora.r * x for x in wrapped]
    n_lora = sum(tensors)
    lora_b = sum(block_bytes(x * adapter_elem) for x in tensors)
    static = [
        base, parts16,
        Term("LoRA parameters", lora_b, f"{n_lora:,} params, r={lora.r}, {len(targets)} linears"
             + (", DoRA magnitudes" if lora.use_dora else "")
             + (f" ({n_linear:,}) + {n_lora - n_linear:,} on the experts and routers" if wrapped else "")),
        Term("LoRA gradients", lora_b, f"{adapter_elem} B each"),
    ]
    paged = t.optim.startswith("paged_")
    static.append(Term(f"optimizer states ({t.optim})", optimizer_bytes(t.optim, tensors, adapter_elem),
                       "paged: unified memory outside torch's pool, not counted" if paged else
                       ("2 x 8-bit + absmax" if "8bit" in t.optim else f"2 x {adapter_elem} B"), counted=not paged))
    if q4:
        static.append(Term("dequantization buffer", block_bytes(s * max(base_numels)), "largest 4-bit weight, dequantized"))
    if sh.dense16:  # after the terms fsdp_static unpacks by position
        what = "MoE experts and routers" if sh.experts else "other weights"
        static.append(Term("weights left 16-bit (not nn.Linear)", sum(block_bytes(x * s) for x in sh.dense16),
                           f"{what}: {sum(sh.dense16):,} params; bitsandbytes quantizes nn.Linear only"))

    if dist[1] == "fsdp":
        static = fsdp_static(recipe, sh, static, dist[0], s)

    # training micro-batch
    A = layer_activation_bytes(sh, backend, s, a, lora.r, lora.use_dora)
    gc = t.gradient_checkpointing
    # RoPE cos/sin; Unsloth's final RMSNorm keeps its input (the hf run measured no such tensor)
    fixed = 2 * 4 * sh.head_dim * seq + ((s * sh.hidden + 4) * n if backend == "unsloth" else 0)
    if gc is False:
        act = Term("saved activations, no checkpointing", sh.layers * A * n + fixed,
                   f"{sh.layers} layers x {A / 1024:.1f} KiB/token x {n:,} tokens")
    elif gc == "unsloth" and backend == "unsloth":
        act = Term("saved activations, offloaded ckpt", 2 * a * sh.hidden * n + fixed,
                   f"layer inputs in pinned host RAM ({sh.layers * a * sh.hidden * n / GiB:.1f} GiB)")
    else:
        act = Term("saved activations, checkpointing", sh.layers * a * sh.hidden * n + fixed,
                   f"{sh.layers} layer inputs x {n:,} tokens")
    recompute = A * n if gc else 0
    work = Term("one layer's backward", recompute + a * (2 * sh.intermediate + sh.hidden) * n,
                (f"recomputed layer {A / 1024:.1f} KiB/token + " if gc else "") + "MLP and residual gradients")
    static_b = sum(x.bytes for x in static if x.counted)
    free = budget - static_b - act.bytes - work.bytes
    logit = Term("logits and loss", logits_bytes(sh, backend, n, s, a, free),
                 "Unsloth fused CE, chunked" if backend == "unsloth" else "TRL chunked log-prob head")
    train = [act, work, logit]
    attn_hf = backend == "hf" and recipe.model.attn_implementation != "flash_attention_2"
    if attn_hf:
        masks = sh.mask_kinds
        train.append(Term("attention mask", masks * block_bytes(batch * seq * seq),
                          "4-D bool causal mask" if masks == 1 else
                          f"4-D bool masks, full and sliding window ({sh.sliding_window} tokens)"))
    train += method_terms(recipe, sh, backend, s, seq, lora_b)

    # held-out evaluation: no grad, a bigger batch (train.py)
    eval_terms: list[Term] = []
    # train.py scores held-out data before and after training (and every eval_every steps)
    if recipe.data.eval is not None or recipe.data.eval_fraction > 0:
        eb = t.eval_batch_size or max(batch, 8)
        ne = eb * seq
        eval_terms = [
            Term("eval forward, no grad", a * (2 * sh.hidden + 3 * sh.intermediate) * ne, f"batch {eb} x {seq}"),
            Term("eval logits", logits_bytes(sh, backend, ne, s, a, budget - static_b, grad=False)),
        ]
        if attn_hf:
            eval_terms.append(Term("eval attention mask", sh.mask_kinds * block_bytes(eb * seq * seq)))
    dyn = max(train_peak(train), sum(x.bytes for x in eval_terms))
    slack = Term("allocator slack (assumed)", ALLOCATOR_SLACK * dyn, f"{ALLOCATOR_SLACK:.0%} of the larger of train/eval")
    p = Plan(model=recipe.model.name, config_source=source, target=target, backend=backend, dtype=dtype,
             batch_size=batch, max_seq_length=seq, static=static, train=train, eval=eval_terms, slack=slack,
             budget_bytes=budget, shapes=sh, lora_params=n_lora)
    p.notes.append(f"backend {backend} ({why})")
    p.gpus, p.strategy = dist
    if dist[0] > 1:
        p.notes.append(f"per rank of {dist[0]} x {target}, distributed.strategy {dist[1]}: per-device batch {batch} "
                       f"(global batch {recipe.train.batch_size} x {recipe.train.grad_accum} split over the ranks)")
    if dist[1] == "fsdp":
        whole = sum(nf4_bytes(i * o) for _, i, o in sh.linears) if q4 else 0
        size = (whole + sh.embed_params * 4 + sh.lm_head_params * 4) / GiB
        p.notes.append(f"host RAM while loading: rank 0 reads the whole 4-bit model (~{size:.1f} GiB) once and sends "
                       "each rank its shard; the other ranks hold only their shards" if q4 else
                       f"host RAM while loading: each rank reads the whole 16-bit model (~{size:.1f} GiB) before "
                       f"sharding, so a node needs ~{dist[0]} x that")
    if recipe.kernels == "fastft":
        p.notes.append("kernels: fastft: the activation terms are the backend's own LoRA path's; fastft's fused "
                       "kernels are planned the same")
    if sh.experts:
        p.notes.append(f"mixture of experts: {sh.experts} experts, {sh.experts_per_token} per token; "
                       f"{sh.total_params:,} params, {sh.active_params:,} active per token (embeddings included)")
        p.notes.append("the experts are 3-D tensors, not nn.Linear: 4-bit loading leaves them 16-bit (counted above), "
                       "and fastft's fused kernels leave them to PEFT"
                       + (f"; PEFT puts LoRA on them too (target_parameters), {sum(wrapped) * lora.r:,} params, "
                          "counted in the LoRA terms" if wrapped else "; PEFT puts no LoRA on them"))
        p.notes.append(f"activations: the MLP width is the top-{sh.experts_per_token} experts' together "
                       f"({sh.intermediate:,}), an estimate no run has checked")
    if sh.sliding_window:
        p.notes.append(f"sliding-window layers ({sh.sliding_window} tokens) cost no less memory than full ones in "
                       "training here: no KV cache, and the activations and saved inputs are per token"
                       + ("; the hf backend builds one 4-D mask per attention kind" if attn_hf else ""))
    tower = IMAGE_TEXT.get(source.split(" ", 1)[0])
    if tower:
        p.notes.append(f"the hub checkpoint is an image-text model; its vision tower ({tower}, ~0.8 GiB in 16-bit) "
                       "is not counted: the config is its text decoder, which is what trains on text")
    if seq > sh.max_positions > 0:
        p.notes.append(f"model.max_seq_length {seq} exceeds the config's max_position_embeddings {sh.max_positions}")
    return p


def _distributed(recipe: Recipe, gpus: int, strategy: str | None) -> tuple[tuple[int, str], int]:
    """((gpus, strategy), per-device batch) for ``plan``."""
    if gpus < 1:
        raise PlanError(f"--gpus: must be >= 1, got {gpus}")
    if strategy is not None and strategy not in STRATEGIES:
        raise PlanError(f"--strategy: must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    t = recipe.train
    if gpus == 1:
        return (1, "single"), t.batch_size
    how = strategy or ("ddp" if recipe.distributed.strategy == "auto" else recipe.distributed.strategy)
    split = split_batch(t.batch_size, t.grad_accum, gpus)
    if split is None:
        raise PlanError(f"train.batch_size={t.batch_size} x train.grad_accum={t.grad_accum} cannot be split evenly "
                        f"over {gpus} GPUs; make it a multiple of {gpus}")
    return (gpus, how), split[0]


def format_plan(p: Plan) -> str:
    gb = lambda b: f"{b / GiB:8.2f}"  # noqa: E731
    tgt = TARGETS[p.target]
    lines = [f"fastft plan: {p.model} ({p.config_source})"
             + (f" -- per rank, {p.gpus} GPUs, {p.strategy}" if p.gpus > 1 else ""),
             f"  {p.shapes.total_params:,} params; LoRA {p.lora_params:,} trainable; backend {p.backend}, "
             f"{p.dtype}; batch {p.batch_size} x {p.max_seq_length} tokens; target {p.target}: {tgt.description}",
             "", f"  {'term':<40} {'GiB':>8}  note"]
    section = lambda title, terms: [f"  -- {title}"] + [  # noqa: E731
        f"  {t.name:<40} {gb(t.bytes) if t.counted else '   (' + format(t.bytes / GiB, '.2f') + ')'}  {t.note}"
        for t in terms]
    lines += section("static", p.static)
    lines += section(f"training micro-batch ({p.batch_size * p.max_seq_length:,} tokens; peak = saved + "
                     "max(layer backward, logits) + mask)", p.train)
    if p.eval:
        lines += section("held-out evaluation (no grad)", p.eval)
    lines += [f"  {p.slack.name:<40} {gb(p.slack.bytes)}  {p.slack.note}",
              f"  {'TOTAL (planned peak reserved)':<40} {gb(p.total_bytes)}  "
              f"static + max(train {p.train_bytes / GiB:.2f}, eval {p.eval_bytes / GiB:.2f}) + slack",
              f"  {'budget on ' + p.target:<40} {gb(p.budget_bytes)}  {tgt.memory_bytes / GiB:.0f} GiB - 0.5 GiB CUDA context",
              ""]
    verdict = "FITS" if p.fits else "DOES NOT FIT"
    lines.append(f"  {verdict} on {p.target}: {p.total_bytes / GiB:.2f} of {p.budget_bytes / GiB:.2f} GiB "
                 f"({100 * p.total_bytes / p.budget_bytes:.0f}%)")
    if p.max_seq_length_fit is not None or p.max_batch_size_fit is not None:
        seq = p.max_seq_length_fit or "none (not even 256)"
        bat = p.max_batch_size_fit or "none (not even 1)"
        lines.append(f"  largest max_seq_length that fits at batch {p.batch_size}: {seq}  "
                     f"(multiples of 256, up to {p.shapes.max_positions})")
        lines.append(f"  largest batch_size that fits at max_seq_length {p.max_seq_length}: {bat}")
    lines += [f"  note: {n}" for n in p.notes]
    return "\n".join(lines)

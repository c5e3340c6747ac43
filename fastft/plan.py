"""VRAM planner: will this recipe fit on that GPU? Answered from the model config alone.

    fastft plan recipes/llama3-8b-qlora-alpaca-rtx4090.yaml
    fastft plan recipes/llama3-8b-qlora-alpaca-rtx4090.yaml --target a100-40 --set model.max_seq_length=4096

    from fastft import plan, recipe
    p = plan.plan(recipe.load("recipes/llama3-8b-qlora-chat.yaml"), target="rtx4090")
    p.total_bytes, p.fits, p.max_seq_length, p.max_batch_size

The model is built on PyTorch's ``meta`` device (shapes, no weights, no download; ``fastft.shapes``),
so planning an 8B recipe takes seconds on a laptop. Where the config comes from: a local checkpoint
folder's config.json, the embedded ``fastft-tiny``, or ``fastft.shapes.HUB_CONFIGS``, which maps the
usual hub ids to the public configs shipped in fastft/assets/configs (as do fastft.models'
``synthetic:<arch>`` names).

The model of memory
-------------------
Symbols: L layers, H hidden size, I MLP size, Hq = heads x head_dim, Hkv = kv_heads x head_dim,
nh heads, V vocab, r LoRA rank, N = batch_size x max_seq_length tokens per micro-batch (packing fills
rows; without it a batch pads to its longest row, so N is the worst case), s the compute dtype's
bytes (2 for bf16/fp16, 4 for fp32), a the residual stream's bytes, P the elements of one
quantized linear weight. Every tensor is rounded up to the CUDA caching allocator's 512-byte block.

Static (alive the whole run):
  4-bit base weights  sum over quantized linears of  P/2 (two NF4 codes a byte)
                      + P/64 (uint8 absmax per 64-block, double quantized)
                      + 4*ceil(P/64/256) (fp32 absmax of each 256-block of absmax) + 64 (NF4 code) + 4.
                      The LM head is never quantized.  16-bit LoRA (load_in_4bit: false): 2*P.
  16-bit parts        (embeddings + LM head (once if tied) + 2L+1 RMSNorm weights) x w, where w is
                      the compute dtype's bytes; hf backend with 4-bit: 4, because PEFT's
                      prepare_model_for_kbit_training upcasts every non-4-bit parameter to fp32.
  LoRA parameters     sum over adapted linears of r*(in+out) (+ out for DoRA's magnitude) x p,
                      p = 2 with bf16 compute (TRL keeps adapters in bf16), else 4 (fastft's train.py).
  gradients           the LoRA parameters again (same dtype).
  optimizer states    adamw_torch: 2 states x numel x p; paged_adamw_32bit: 2 x numel x 4.
                      adamw_8bit / paged_adamw_8bit: tensors of >= 4096 elements
                      keep 2 uint8 states + fp32 absmax per 256-block (2*numel + 8*ceil(numel/256)),
                      smaller ones 2 fp32 states (8*numel).  paged_*: the same sizes, but in CUDA
                      unified memory outside torch's pool, evicted to the host under pressure: shown,
                      counted 0 toward the total.
  dequant buffer      one dequantized copy of the largest 4-bit weight, s*max(P) (Unsloth keeps it as
                      a global buffer; bitsandbytes/PEFT allocate it per matmul).

Per micro-batch (training):
  layer activations   bytes saved for backward per token per layer, A:
                      hf backend (measured exactly on CPU, fp32; see tests/test_plan.py):
                        A = 2*4H (fp32 RMSNorm inputs) + 2aH (norm outputs) + aHq (attention output)
                            + a(Hq + 2Hkv) (roped q, k, v; GQA is not expanded) + 4nh (logsumexp)
                            + 4aI (gate, silu(gate), up, their product) + 7ar (LoRA A outputs) + 8
                      unsloth backend (its fused kernels' save lists: RMSNorm keeps its input,
                      LoRA_QKV / LoRA_W / LoRA_MLP keep their input and the MLP's gate and up):
                        A = 4sH + 2sHq + 2sHkv + 2sI + 4nh + 8
                      DoRA leaves Unsloth's fused path for PEFT's, so it uses the hf formula with
                      a = s, plus 2s(Hq + 2Hkv + H + 2I + H) for DoRA's base and LoRA outputs.
                      hf on a GPU keeps a = 4 (the residual stream stays fp32 under bf16 autocast,
                      and autocast's bf16 copies of the fp32 inputs roughly take the place of the
                      bf16 savings): an estimate; the CPU measurements below cannot check it.
  saved activations   what stays alive from the forward until its layer's backward:
                      no checkpointing:          L*A*N
                      gradient_checkpointing:    L*a*H*N (each layer's input)
                      'unsloth' (offloaded):     2*a*H*N (the inputs live on the host; two in flight)
                      + RoPE cos/sin 2*4*head_dim*seq; unsloth: + (sH + 4)*N, its final RMSNorm's
                      input and 1/rms (the hf run on CPU holds no such tensor: measured).
  one layer's         with checkpointing the layer's activations are recomputed, A*N, then:
  backward            a*(2I + H)*N, the gradients of the MLP's two I-wide products and of the residual
                      stream alive at once (measured on CPU: within 0.4%, independent of L).
  logits and loss     hf (TRL 1.16's chunked log-prob head; the (N, V) logits never exist):
                        min(N, 4096)*32768*s (one logits tile, forward's or backward's) + 4HN (fp32
                        grad of the hidden states) + aHN (hidden states gathered for the head)
                        + 32N (per-token statistics)
                      unsloth (unsloth_zoo's fused CE, 16 bytes a logit in flight, in chunks of at most
                      min(4 GiB, half the free memory), counts rounded up to a multiple of 4):
                        16*V*N / n_chunks + sHN (grad of the hidden states)
  attention mask      hf with sdpa/eager: batch*seq^2 bytes (the 4-D bool causal mask); unsloth: 0.
  train peak          saved activations + max(one layer's backward, logits and loss) + mask: the loss's
                      backward finishes (and frees its tiles) before the first layer's backward starts.
Held-out evaluation (no grad, batch max(batch_size, 8) unless train.eval_batch_size, N_e tokens):
  eval forward        N_e * a*(2H + 3I) (one layer's live tensors) + the logits term for N_e,
                      without gradients.
Allocator slack       reserved - allocated: 8% of the per-micro-batch terms (variable-size
                      transients fragment the caching allocator). Assumed: a CPU run has no caching allocator to measure.

  total = static + max(train peak, eval forward) + allocator slack
  fits  = total <= target memory - 0.5 GiB (CUDA context and cuBLAS workspaces, outside torch's pool)

What is measured and what is assumed: on the tiny model on CPU (tests/test_plan.py) the hf saved
activations match the bytes autograd saves exactly, the decoder's forward+backward peak within 5%,
and a whole micro-batch with TRL's LM head within 8% (the plan is 4-6% under there, because TRL's
CPU fallback folds logits tiles with temporaries its GPU kernel does not make). Unsloth's CPU
backend runs the stock modules (measured: the hf A, 19,704 B/token/layer on the tiny model), so its
fused-kernel formulas can only be checked on a GPU: they follow its source and, like the allocator
slack, are estimates until a GPU run compares the total with torch.cuda.max_memory_reserved
(bench/gpu.sh writes both); bench.train turns evaluation off, so compare its peak with the plan made
with --set data.eval_fraction=0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from .hardware import GiB, TARGETS
from .recipe import Recipe
from .shapes import PlanError, Shapes, find_config, shapes  # noqa: F401 (fastft.plan's names for callers)

BLOCK = 512  # CUDA caching allocator rounds every allocation up to this
CONTEXT_HEADROOM = GiB // 2  # CUDA context + cuBLAS workspaces, outside torch's pool
ALLOCATOR_SLACK = 0.08  # reserved - allocated, as a fraction of the per-micro-batch terms (assumed)
TRL_TOKEN_CHUNK, TRL_VOCAB_CHUNK = 4096, 32768  # trl/kernels/chunked_logprob.py (TRL 1.16)
UNSLOTH_CE_BYTES_PER_LOGIT, UNSLOTH_CE_CAP = 16, 4 * GiB  # unsloth_zoo fused_losses (2026.10)
ADAM8_MIN = 4096  # bitsandbytes keeps smaller tensors' states in fp32 (min_8bit_size)


# --- the terms --------------------------------------------------------------------------------------

def _blk(nbytes: float) -> int:
    """Bytes the caching allocator hands out for one tensor of ``nbytes``."""
    return int(math.ceil(nbytes / BLOCK) * BLOCK) if nbytes > 0 else 0


def nf4_bytes(numel: int) -> int:
    """One bitsandbytes NF4 weight with double quantization, blocksize 64 (the layout in fastft.kernels.nf4)."""
    blocks = math.ceil(numel / 64)
    return (_blk(math.ceil(numel / 2)) + _blk(blocks) + _blk(4 * math.ceil(blocks / 256))
            + _blk(16 * 4) + _blk(4))


def adapted(sh: Shapes, target_modules) -> list[tuple[str, int, int]]:
    if target_modules == "all-linear":
        return list(sh.linears)
    hit = [l for l in sh.linears if l[0].split(".")[-1] in target_modules]
    missing = [t for t in target_modules if not any(l[0].split(".")[-1] == t for l in sh.linears)]
    if missing:
        valid = sorted({l[0].split(".")[-1] for l in sh.linears})
        raise PlanError(f"lora.target_modules: {', '.join(missing)} not in this model; valid: {', '.join(valid)} "
                        "(or all-linear)")
    return hit


def optimizer_bytes(optim: str, tensor_numels: list[int], elem: int) -> int:
    if optim == "adamw_torch":  # torch keeps the states in the parameters' dtype
        return sum(2 * _blk(n * elem) for n in tensor_numels)
    if optim == "paged_adamw_32bit":  # bitsandbytes' 32-bit states are fp32 whatever the parameters
        return sum(2 * _blk(n * 4) for n in tensor_numels)
    # 8-bit AdamW (bitsandbytes blockwise, 256-element blocks)
    total = 0
    for n in tensor_numels:
        if n >= ADAM8_MIN:
            total += 2 * _blk(n) + 2 * _blk(4 * math.ceil(n / 256))
        else:
            total += 2 * _blk(4 * n)
    return total


def layer_activation_bytes(sh: Shapes, backend: str, s: int, a: int, r: int, dora: bool) -> float:
    """A: bytes saved for backward per token per decoder layer (formulas in the module docstring)."""
    H, I, Hq, Hkv, nh = sh.hidden, sh.intermediate, sh.q_dim, sh.kv_dim, sh.heads
    if backend == "unsloth" and not dora:
        return 4 * s * H + 2 * s * Hq + 2 * s * Hkv + 2 * s * I + 4 * nh + 8
    hf = 2 * 4 * H + 2 * a * H + a * Hq + a * (Hq + 2 * Hkv) + 4 * nh + 4 * a * I + 7 * a * r + 8
    if dora:
        hf += 2 * s * (Hq + 2 * Hkv + H + 2 * I + H)
    return hf


def logits_bytes(sh: Shapes, backend: str, n: int, s: int, a: int, free: float, grad: bool = True) -> float:
    """Transient memory of the LM head + loss for n tokens (module docstring, 'logits and loss')."""
    H, V = sh.hidden, sh.vocab
    if backend == "unsloth":
        budget = max(min(UNSLOTH_CE_CAP, free / 2), 1)
        whole = UNSLOTH_CE_BYTES_PER_LOGIT * V * n
        exact = whole / budget
        chunks = 1 if exact <= 1 else min(math.ceil(exact / 4) * 4, n)
        return whole / chunks + (s * H * n if grad else 0)
    tile = min(n, TRL_TOKEN_CHUNK) * TRL_VOCAB_CHUNK * s  # one at a time: forward's is freed before backward's
    return tile + a * H * n + 32 * n + (4 * H * n if grad else 0)


# --- the plan --------------------------------------------------------------------------------------

def train_peak(train: list["Term"]) -> float:
    """saved activations + max(one layer's backward, logits and loss) + attention mask"""
    act, layer, logits, *mask = train
    return act.bytes + max(layer.bytes, logits.bytes) + sum(t.bytes for t in mask)


@dataclass
class Term:
    name: str
    bytes: float
    note: str = ""
    counted: bool = True  # paged optimizer states are shown but live outside torch's pool


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
    dist, batch = _distributed(recipe, gpus, strategy)
    p = _plan(recipe, target, sh, source, batch, recipe.model.max_seq_length, dist=dist)
    if search:
        p.max_seq_length_fit = _largest(lambda t: _plan(recipe, target, sh, source, p.batch_size, t, dist=dist).fits,
                                        256, max(sh.max_positions, 256), 256)
        p.max_batch_size_fit = _largest(lambda b: _plan(recipe, target, sh, source, b, p.max_seq_length,
                                                        dist=dist).fits, 1, 4096, 1)
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
          dist: tuple[int, str] = (1, "single")) -> Plan:
    backend, why = planned_backend(recipe)
    if dist[0] > 1:  # as fastft.backends.choose: Unsloth trains on one GPU
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
        base = Term("base weights, 16-bit", sum(_blk(x * s) for x in base_numels), f"{sum(base_numels):,} params")
    w16 = 4 if (backend == "hf" and q4) else s
    n16 = sh.embed_params + sh.lm_head_params + sh.norm_params
    parts16 = Term("embeddings, LM head, norms", _blk(sh.embed_params * w16) + _blk(sh.lm_head_params * w16)
                   + (2 * sh.layers + 1) * _blk(sh.hidden * w16),
                   f"{n16:,} params x {w16} B" + (" (PEFT upcasts them to fp32)" if w16 == 4 and s == 2 else "")
                   + (", LM head tied" if sh.tied else ""))
    targets = adapted(sh, lora.target_modules)
    tensors = []
    for _, i, o in targets:
        tensors += [lora.r * i, lora.r * o] + ([o] if lora.use_dora else [])
    n_lora = sum(tensors)
    lora_b = sum(_blk(x * adapter_elem) for x in tensors)
    static = [
        base, parts16,
        Term("LoRA parameters", lora_b, f"{n_lora:,} params, r={lora.r}, {len(targets)} linears"
             + (", DoRA magnitudes" if lora.use_dora else "")),
        Term("LoRA gradients", lora_b, f"{adapter_elem} B each"),
    ]
    paged = t.optim.startswith("paged_")
    static.append(Term(f"optimizer states ({t.optim})", optimizer_bytes(t.optim, tensors, adapter_elem),
                       "paged: unified memory outside torch's pool, not counted" if paged else
                       ("2 x 8-bit + absmax" if "8bit" in t.optim else f"2 x {adapter_elem} B"), counted=not paged))
    if q4:
        static.append(Term("dequantization buffer", _blk(s * max(base_numels)), "largest 4-bit weight, dequantized"))

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
        train.append(Term("attention mask", _blk(batch * seq * seq), "4-D bool causal mask"))
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
            eval_terms.append(Term("eval attention mask", _blk(eb * seq * seq)))
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
    if seq > sh.max_positions > 0:
        p.notes.append(f"model.max_seq_length {seq} exceeds the config's max_position_embeddings {sh.max_positions}")
    return p


def method_terms(recipe: Recipe, sh: Shapes, backend: str, s: int, seq: int, lora_b: float) -> list[Term]:
    """What train.method adds to a step beyond SFT's terms (added on top of the training peak: an
    upper bound, since GRPO's generation runs before the step's forward). DPO/ORPO's doubled rows
    are in the activation terms already (two rows per pair)."""
    t = recipe.train
    out = []
    if t.method == "dpo":
        copy = recipe.model.adapter is not None
        out.append(Term("DPO reference", lora_b if copy else 0,
                        "frozen copy of the starting adapter" if copy else "base with the adapter disabled: no copy"))
    if t.method == "grpo":
        rows = t.batch_size * t.grad_accum  # one generation batch: every answer of an optimizer step
        tokens = rows * (seq + t.max_completion_length)
        out.append(Term("GRPO generation KV cache", 2 * sh.layers * sh.kv_dim * s * tokens,
                        f"{rows} answers x {seq}+{t.max_completion_length} tokens, K and V per layer"))
        out.append(Term("GRPO sampling logits", rows * sh.vocab * 4 * 2, "last position, fp32, with the softmax"))
        if t.beta is None or t.beta > 0:
            out.append(Term("GRPO reference (KL)", lora_b if recipe.model.adapter else 0,
                            "base with the adapter disabled" if not recipe.model.adapter else
                            "frozen copy of the starting adapter"))
    return out


def _distributed(recipe: Recipe, gpus: int, strategy: str | None) -> tuple[tuple[int, str], int]:
    """((gpus, strategy), per-device batch) for ``plan``."""
    from .distributed import STRATEGIES, split_batch

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


def fsdp_static(recipe: Recipe, sh: Shapes, static: list[Term], n: int, s: int) -> list[Term]:
    """One rank's static terms under FSDP over ``n`` GPUs (fastft.distributed.shard): the sharded
    parameters, gradients and optimizer states are 1/n; the quantization state (absmax, code) is
    kept whole on every rank; the all-gathered units (two decoder layers: the running one and the
    prefetched next; the LM head from the end of the forward to its backward) are added. With
    distributed.cpu_offload the shards, gradients and optimizer states live in host memory."""
    q4 = recipe.model.load_in_4bit
    off = recipe.distributed.cpu_offload
    where = "host RAM (cpu_offload), not counted" if off else f"1/{n} shard"
    base, parts16, lora_p, lora_g, opt, *rest = static
    out = []
    if q4:
        packed = sum(_blk(math.ceil(i * o / 2)) for _, i, o in sh.linears)
        out.append(Term(f"base weights, 4-bit NF4, 1/{n}", packed / n, where, counted=not off))
        out.append(Term("NF4 quantization state, whole", base.bytes - packed,
                        "absmax + code of every layer on every rank (not sharded)"))
    else:
        out.append(Term(f"{base.name}, 1/{n}", base.bytes / n, where, counted=not off))
    out.append(Term(f"{parts16.name}, 1/{n}", parts16.bytes / n, parts16.note + f"; {where}", counted=not off))
    for t in (lora_p, lora_g, opt):
        out.append(Term(f"{t.name}, 1/{n}", t.bytes / n, f"{t.note}; {where}", counted=t.counted and not off))
    out += rest
    layer0 = [(name, i, o) for name, i, o in sh.linears if ".layers.0." in f".{name}."]
    lora_layer = sum(recipe.lora.r * (i + o) for name, i, o in adapted(sh, recipe.lora.target_modules)
                     if ".layers.0." in f".{name}.")
    layer0 = [(i, o) for _, i, o in layer0]
    w = (sum(_blk(math.ceil(i * o / 2)) for i, o in layer0) if q4 else sum(_blk(i * o * s) for i, o in layer0))
    gathered = w + _blk(2 * sh.hidden * s) + _blk(lora_layer * s)
    out.append(Term("gathered decoder layers (2)", 2 * gathered,
                    f"all-gathered for compute: the running layer + the prefetched next, {gathered / GiB:.2f} GiB each"))
    head = sh.lm_head_params or sh.embed_params
    out.append(Term("gathered LM head", _blk(head * s), "end of forward to its backward"
                    + (" (tied: with the embeddings)" if sh.tied else "")))
    return out


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

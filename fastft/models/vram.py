"""The VRAM model behind ``fastft plan``: each term's bytes from a model's shapes and a recipe.

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
  16-bit parts        (embeddings + LM head (once if tied) + every norm weight and bias) x w, where w is
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
  attention mask      hf with sdpa/eager: batch*seq^2 bytes per attention kind (transformers builds one
                      4-D bool mask for full and one for sliding-window layers); unsloth: 0.
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
from dataclasses import dataclass

from ..hardware import GiB
from ..recipe import Recipe
from .shapes import PlanError, Shapes

BLOCK = 512  # CUDA caching allocator rounds every allocation up to this
CONTEXT_HEADROOM = GiB // 2  # CUDA context + cuBLAS workspaces, outside torch's pool
ALLOCATOR_SLACK = 0.08  # reserved - allocated, as a fraction of the per-micro-batch terms (assumed)
TRL_TOKEN_CHUNK, TRL_VOCAB_CHUNK = 4096, 32768  # trl/kernels/chunked_logprob.py (TRL 1.16)
UNSLOTH_CE_BYTES_PER_LOGIT, UNSLOTH_CE_CAP = 16, 4 * GiB  # unsloth_zoo fused_losses (2026.10)
ADAM8_MIN = 4096  # bitsandbytes keeps smaller tensors' states in fp32 (min_8bit_size)


@dataclass
class Term:
    name: str
    bytes: float
    note: str = ""
    counted: bool = True  # paged optimizer states are shown but live outside torch's pool


# --- the terms --------------------------------------------------------------------------------------

def block_bytes(nbytes: float) -> int:
    """Bytes the caching allocator hands out for one tensor of ``nbytes``."""
    return int(math.ceil(nbytes / BLOCK) * BLOCK) if nbytes > 0 else 0


def nf4_bytes(numel: int) -> int:
    """One bitsandbytes NF4 weight with double quantization, blocksize 64 (the layout in fastft.kernels.nf4_format)."""
    blocks = math.ceil(numel / 64)
    return (block_bytes(math.ceil(numel / 2)) + block_bytes(blocks) + block_bytes(4 * math.ceil(blocks / 256))
            + block_bytes(16 * 4) + block_bytes(4))


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
        return sum(2 * block_bytes(n * elem) for n in tensor_numels)
    if optim == "paged_adamw_32bit":  # bitsandbytes' 32-bit states are fp32 whatever the parameters
        return sum(2 * block_bytes(n * 4) for n in tensor_numels)
    # 8-bit AdamW (bitsandbytes blockwise, 256-element blocks)
    total = 0
    for n in tensor_numels:
        if n >= ADAM8_MIN:
            total += 2 * block_bytes(n) + 2 * block_bytes(4 * math.ceil(n / 256))
        else:
            total += 2 * block_bytes(4 * n)
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


def train_peak(train: list[Term]) -> float:
    """saved activations + max(one layer's backward, logits and loss) + attention mask"""
    act, layer, logits, *mask = train
    return act.bytes + max(layer.bytes, logits.bytes) + sum(t.bytes for t in mask)


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
        packed = sum(block_bytes(math.ceil(i * o / 2)) for _, i, o in sh.linears)
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
    w = (sum(block_bytes(math.ceil(i * o / 2)) for i, o in layer0) if q4 else sum(block_bytes(i * o * s) for i, o in layer0))
    gathered = w + block_bytes(2 * sh.hidden * s) + block_bytes(lora_layer * s)
    out.append(Term("gathered decoder layers (2)", 2 * gathered,
                    f"all-gathered for compute: the running layer + the prefetched next, {gathered / GiB:.2f} GiB each"))
    head = sh.lm_head_params or sh.embed_params
    out.append(Term("gathered LM head", block_bytes(head * s), "end of forward to its backward"
                    + (" (tied: with the embeddings)" if sh.tied else "")))
    return out

"""fastft's LoRA ops under torch.compile, as Unsloth runs them: every decoder block compiled.

    python -m bench.compile                                  # CPU: interpreter kernels, eager, aot_eager, inductor
    python -m bench.compile --backends eager,aot_eager --layers 2 --out DIR
    python -m bench.compile --device cuda --backends inductor   # the GPU machine

Unsloth (torch >= 2.11 + CUDA) wraps each decoder layer class's forward in torch.compile, so on the GPU
fastft's fused LoRA ops run inside Dynamo. This loads the tiny Llama QLoRA model (4-bit NF4 bases,
LoRA on all seven projections), compiles the forward of each decoder layer in turn (the same code
object for every layer, as Unsloth's per-class wrap gives) and runs forward + backward through the
layer stack, once per kernels mode (fastft: the PEFT layers patched with fastft's ops; fastft-slots:
the same plus fastft's fused QKV / MLP ops in Unsloth's slot calling convention; none: stock PEFT +
bitsandbytes) and compile backend. Recorded per run, from torch._dynamo.utils.counters: graph breaks
(with their reasons), frames compiled, unique graphs, recompiles (a second graph for the next layer's
frame would show here), and the largest difference from the uncompiled run in the loss and in every
LoRA gradient. The result JSON is the evidence for docs/benchmarks.md's compile section.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from bench import common

MODES = ("fastft", "fastft-slots", "none")


def _slots_block(layer):
    """One decoder layer's LoRA work through Unsloth's fused slot calling convention (apply_qkv(self, X),
    apply_o(self, X), the MLP's forward), the attention itself reduced to a sum of the three outputs:
    what the slot ops see inside Unsloth's compiled block, without Unsloth's attention kernels."""
    attn, mlp = layer.self_attn, layer.mlp

    def forward(hidden_states, **_):
        q, k, v = attn.apply_qkv(attn, hidden_states)
        heads = q + k.repeat_interleave(q.shape[-1] // k.shape[-1], -1) + v.repeat_interleave(
            q.shape[-1] // v.shape[-1], -1)
        h = hidden_states + attn.apply_o(attn, heads)
        return h + mlp(h)
    return forward


def load_model(mode: str, n_layers: int | None = None, model_backend: str = "hf"):
    """The tiny QLoRA model with `mode`'s LoRA path; returns (model, layers, patch report).
    ``model_backend`` "unsloth" loads it through Unsloth (its CPU backend) and, for fastft-slots, puts
    Unsloth's own fused LoRA functions in the slots, as its patch_peft_model does on a GPU, before
    fastft takes them."""
    import torch

    from fastft import recipe
    from fastft.models import backends, patch

    r = recipe.from_dict({"model": {"name": "fastft-tiny", "max_seq_length": 64}, "backend": model_backend,
                          "lora": {"r": 8, "alpha": 16},
                          "data": {"train": "asset:data/word-categories.jsonl"}, "output": {"dir": "unused"}})
    torch.manual_seed(0)
    model, _, _ = backends.load(r)
    with torch.no_grad():  # non-zero B (PEFT starts it at 0), so every LoRA gradient shows
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    layers = list(model.base_model.model.model.layers)[:n_layers]
    if mode == "fastft-slots" and model_backend == "unsloth":
        import types

        from unsloth.kernels import fast_lora

        for layer in layers:
            layer.self_attn.apply_qkv = fast_lora.apply_lora_qkv
            layer.self_attn.apply_o = fast_lora.apply_lora_o
            layer.mlp.forward = types.MethodType(fast_lora.apply_lora_mlp_swiglu, layer.mlp)
    elif mode == "fastft-slots":
        from fastft.models.patch import _per_projection_o, _per_projection_qkv

        def apply_lora_qkv(self, X, inplace=True):  # Unsloth's names: patch.apply recognises its slots
            return _per_projection_qkv(self, X)

        def apply_lora_o(self, X):
            return _per_projection_o(self, X)

        def apply_lora_mlp_swiglu(self, X, inplace=True):
            return self.down_proj(self.act_fn(self.gate_proj(X)) * self.up_proj(X))

        import types
        for layer in layers:
            layer.self_attn.apply_qkv = apply_lora_qkv
            layer.self_attn.apply_o = apply_lora_o
            layer.mlp.forward = types.MethodType(apply_lora_mlp_swiglu, layer.mlp)
    report = patch.apply(model, "none" if mode == "none" else "fastft")
    return model, layers, report


def run_stack(model, layers, forwards, hidden, position_embeddings):
    """Forward + backward through `layers` with their `forwards`; (loss, {LoRA parameter: grad})."""
    import torch

    model.zero_grad(set_to_none=True)
    h = hidden.detach().clone().requires_grad_()
    x = h
    for fn in forwards:
        out = fn(x, position_embeddings=position_embeddings, attention_mask=None)
        x = out[0] if isinstance(out, tuple) else out
    loss = (x.float() ** 2).mean()
    loss.backward()
    grads = {f"layers.{i}.{n}": p.grad.detach().clone() for i, layer in enumerate(layers)
             for n, p in layer.named_parameters() if p.grad is not None}
    grads["input"] = h.grad.detach().clone()
    return loss.detach(), grads


def measure(mode: str, backend: str, n_layers: int | None = None, device: str = "cpu", tokens: int = 16,
            model_backend: str = "hf") -> dict:
    """One kernels mode under one compile backend: counters, timings and the differences from eager."""
    import torch
    import torch._dynamo
    from torch._dynamo.utils import counters

    model, layers, report = load_model(mode, n_layers, model_backend)
    model.to(device)
    torch.manual_seed(1)
    hidden = torch.randn(2, tokens, model.config.hidden_size, device=device)
    pos = torch.arange(tokens, device=device)[None].expand(2, -1)
    rot = model.base_model.model.model.rotary_emb(hidden, pos)
    plain = [(_slots_block(l) if mode == "fastft-slots" else l.forward) for l in layers]
    want_loss, want = run_stack(model, layers, plain, hidden, rot)

    torch._dynamo.reset()
    counters.clear()
    compiled = [torch.compile(fn, backend=backend) for fn in plain]
    t0 = time.perf_counter()
    error = None
    try:
        got_loss, got = run_stack(model, layers, compiled, hidden, rot)
    except Exception as e:  # recorded: a mode that does not compile is a result, not a crash
        error = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
    first = time.perf_counter() - t0
    breaks = dict(counters["graph_break"])
    row = {"mode": mode, "backend": backend, "model_backend": model_backend, "layers": len(layers), "device": device,
           "patch": report.summary(), "compile_regime": report.compile_regime,
           "first_call_s": round(first, 3), "error": error,
           "graph_breaks": sum(breaks.values()), "graph_break_reasons": {k.splitlines()[0]: v for k, v in breaks.items()},
           "frames": dict(counters["frames"]), "unique_graphs": counters["stats"].get("unique_graphs", 0),
           "recompiles": sum(v for k, v in counters["recompiles"].items()) if "recompiles" in counters else 0}
    if error is None:
        t0 = time.perf_counter()
        run_stack(model, layers, compiled, hidden, rot)
        row["second_call_s"] = round(time.perf_counter() - t0, 3)
        row["unique_graphs_after_second_call"] = counters["stats"].get("unique_graphs", 0)
        row["max_abs_diff"] = {"loss": abs(got_loss.item() - want_loss.item()),
                               **{k: (got[k] - want[k]).abs().max().item() for k in want}}
        row["grads_compared"] = len(want)
        row["max_abs_diff_overall"] = max(row["max_abs_diff"].values())
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.compile", description=__doc__.split("\n\n")[0])
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--backends", default="eager,aot_eager,inductor")
    p.add_argument("--layers", type=int, default=None, help="decoder layers to compile (default: all 4)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--model-backend", default="hf", choices=("hf", "unsloth"),
                   help="load the model through transformers + PEFT (hf) or Unsloth (its CPU backend off CUDA)")
    p.add_argument("--out", help="folder for the result JSON (default: bench/results/)")
    p.add_argument("--no-write", action="store_true", help="print the result, write no file")
    args = p.parse_args(argv)
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before fastft.kernels is imported
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        # Inductor's FX graph cache keys on the graph, not on a custom op's fake implementation: a
        # graph compiled before a change to one would be reused and hide (or fake) a failure
        import tempfile

        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="fastft-inductor-")
    rows = []
    for mode in args.modes.split(","):
        for backend in args.backends.split(","):
            row = measure(mode, backend, args.layers, args.device, model_backend=args.model_backend)
            rows.append(row)
            print(f"{mode:13s} {backend:10s} graph breaks {row['graph_breaks']:3d}  unique graphs "
                  f"{row['unique_graphs']}  recompiles {row['recompiles']}  first call {row['first_call_s']:.1f} s  "
                  + (f"max |diff| {row['max_abs_diff_overall']:.2e}" if row["error"] is None else row["error"]),
                  file=sys.stderr)
    import torch

    doc = common.result(kind="compile", name=f"tiny-llama-layers-{args.model_backend}", target=args.device,
                        config={"modes": args.modes, "backends": args.backends, "layers": args.layers,
                                "model_backend": args.model_backend,
                                "torch": torch.__version__, "triton_interpret": os.environ.get("TRITON_INTERPRET")},
                        metrics={"runs": rows})
    if not args.no_write:
        print(f"wrote {common.write(doc, args.out)}", file=sys.stderr)
    print(common.dumps_line(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())

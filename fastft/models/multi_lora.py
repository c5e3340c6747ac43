"""Several LoRA adapters on one frozen base in one forward: each row of the batch through its own
adapter, the base product once for all of them.

    from fastft.models import multi_lora
    model = get_peft_model(base, LoraConfig(r=8, ...), adapter_name="a")
    model.add_adapter("b", LoraConfig(r=16, ...))
    multi = multi_lora.attach(model, ["a", "b"])
    with multi.rows([3, 5]):              # the batch's first 3 sequences are a's, the next 5 b's
        logits = model(input_ids=ids).logits
    multi.detach()                        # the PEFT layers' own forward again

Every PEFT LoRA ``Linear`` computes base(x) once for the whole batch, then the adapters' products
on their own rows with fastft.kernels.segmented_lora (Triton on CUDA, its torch reference on CPU),
so row i's output is exactly what the model gives with only its adapter active. A sequence's
gradients reach only its own adapter's A and B. The batch must hold each adapter's sequences
together, in the order of ``attach``'s names; an adapter with no sequences in a batch is skipped.
Dropout on the LoRA input is per adapter in PEFT; this path needs ``lora_dropout`` 0.
"""
from __future__ import annotations

import contextlib
import types

from ..errors import FastftError


class MultiLoRAError(FastftError, ValueError):
    """Adapters that cannot share a forward; the message names the layer or adapter and the fix."""


class MultiLoRA:
    def __init__(self, model, names: list[str], layers: list):
        self.model, self.names, self.layers = model, list(names), layers
        self._sequences: list[int] | None = None
        # one forward's row segments, shared by every layer with the same ranks (built once, not per layer)
        self._segments: dict = {}

    @contextlib.contextmanager
    def rows(self, sequences: list[int]):
        """Within the block, the batch's sequences belong to the adapters in order: ``sequences[i]`` of them
        to adapter i (0 allowed)."""
        if len(sequences) != len(self.names) or any(n < 0 for n in sequences):
            raise MultiLoRAError(f"multi-LoRA: give one sequence count >= 0 per adapter ({', '.join(self.names)}), "
                                 f"got {sequences}")
        self._sequences = list(sequences)
        try:
            yield self
        finally:
            self._sequences = None
            self._segments.clear()

    def segments(self, per_seq: int, ranks: tuple[int, ...], device):
        """The Segments of this block's rows (sequences x ``per_seq`` tokens) for the adapters that have rows."""
        from ..kernels.segmented_lora import Segments

        key = (per_seq, ranks, str(device))
        if key not in self._segments:
            rows = [n * per_seq for n in self._sequences if n]
            self._segments[key] = Segments.of(rows, list(ranks), device=device)
        return self._segments[key]

    def detach(self) -> None:
        for layer in self.layers:
            layer.__dict__.pop("forward", None)
        self.layers = []


def attach(model, names: list[str]) -> MultiLoRA:
    """Route every PEFT LoRA Linear of ``model`` through the adapters ``names`` by rows (see module doc)."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    if not names or len(set(names)) != len(names):
        raise MultiLoRAError(f"multi-LoRA: give distinct adapter names, got {names}")
    layers = []
    for qual, m in model.named_modules():
        if not isinstance(m, LoraLinear):
            continue
        missing = [n for n in names if n not in m.lora_A]
        if missing:
            raise MultiLoRAError(f"multi-LoRA: {qual} has no adapter {', '.join(missing)}; every adapter must target "
                                 "the same modules (lora.target_modules)")
        for n in names:
            p = m.lora_dropout[n].p if hasattr(m.lora_dropout[n], "p") else 0.0
            if p:
                raise MultiLoRAError(f"multi-LoRA: adapter {n} has lora_dropout {p} on {qual}; training adapters "
                                     "together needs lora.dropout 0")
            if m.use_dora.get(n):
                raise MultiLoRAError(f"multi-LoRA: adapter {n} uses DoRA on {qual}; training adapters together "
                                     "needs use_dora false")
        layers.append(m)
    if not layers:
        raise MultiLoRAError("multi-LoRA: the model has no PEFT LoRA Linear layers")
    multi = MultiLoRA(model, names, layers)
    for m in layers:
        m.forward = types.MethodType(_forward(multi), m)
    return multi


def _forward(multi: MultiLoRA):
    from ..kernels.segmented_lora import segmented_lora

    def forward(self, x, *args, **kwargs):
        result = self.base_layer(x, *args, **kwargs)
        sequences = multi._sequences
        if sequences is None:
            raise MultiLoRAError("multi-LoRA: a forward outside `with multi.rows([...])`: say which sequences "
                                 "belong to which adapter")
        if x.shape[0] != sum(sequences):
            raise MultiLoRAError(f"multi-LoRA: the batch has {x.shape[0]} sequences, the rows say {sum(sequences)}")
        per_seq = x[0].numel() // x.shape[-1]  # tokens per sequence
        keep = [i for i, n in enumerate(sequences) if n]
        names = [multi.names[i] for i in keep]
        seg = multi.segments(per_seq, tuple(self.r[n] for n in names), x.device)
        a = [self.lora_A[n].weight for n in names]
        b = [self.lora_B[n].weight for n in names]
        flat = x.reshape(-1, x.shape[-1]).to(a[0].dtype)
        delta = segmented_lora(flat, a, b, [self.scaling[n] for n in names], seg)
        return result + delta.reshape(*result.shape[:-1], delta.shape[-1]).to(result.dtype)

    return forward

"""fastft.models.multi_lora: three adapters (ranks 4, 8, 2) on one frozen base in one forward. Each
sequence's logits are what the model gives with only its adapter active, and the sum of the
adapters' losses gives each adapter exactly its own gradients (fp32 tolerance), with an adapter
that has no sequences in the batch left out."""
import pytest
import torch

from support import assert_close
from fastft.models import multi_lora

RANKS = {"a": 4, "b": 8, "c": 2}
ALPHAS = {"a": 8, "b": 4, "c": 6}  # scalings 2, 0.5, 3


@pytest.fixture()
def peft_model(tiny_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.float32)
    model = None
    for name, r in RANKS.items():  # random A and B: every adapter changes the output from the start
        cfg = LoraConfig(r=r, lora_alpha=ALPHAS[name], target_modules="all-linear", init_lora_weights=False)
        if model is None:
            model = get_peft_model(base, cfg, adapter_name=name)
        else:
            model.add_adapter(name, cfg)
    return model.train()


def _loss(logits, ids):
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def _lora_grads(model, name):
    return {n: p.grad.clone() for n, p in model.named_parameters() if f".{name}." in n and "lora_" in n}


@pytest.mark.parametrize("sequences", [[2, 1, 2], [3, 0, 2]], ids=["all", "b-empty"])
def test_each_sequence_goes_through_its_own_adapter(peft_model, sequences):
    ids = torch.randint(4, 300, (sum(sequences), 12), generator=torch.Generator().manual_seed(1))
    names = list(RANKS)
    starts = [sum(sequences[:i]) for i in range(len(sequences) + 1)]
    solo = {}
    for i, name in enumerate(names):
        if not sequences[i]:
            continue
        peft_model.set_adapter(name)  # PEFT's own path, one adapter active and trainable
        peft_model.zero_grad()
        rows = ids[starts[i]:starts[i + 1]]
        logits = peft_model(input_ids=rows).logits
        _loss(logits, rows).backward()
        solo[name] = (logits.detach(), _lora_grads(peft_model, name))
    for p in peft_model.parameters():  # all three trainable at once
        p.requires_grad_(False)
    for n, p in peft_model.named_parameters():
        if "lora_" in n:
            p.requires_grad_(True)
    peft_model.zero_grad()
    multi = multi_lora.attach(peft_model, names)
    with multi.rows(sequences):
        logits = peft_model(input_ids=ids).logits
    total = sum(_loss(logits[starts[i]:starts[i + 1]], ids[starts[i]:starts[i + 1]])
                for i in range(len(names)) if sequences[i])
    total.backward()
    multi.detach()
    for i, name in enumerate(names):
        if not sequences[i]:
            assert all(p.grad is None or not p.grad.any() for n, p in peft_model.named_parameters()
                       if f".{name}." in n and "lora_" in n)
            continue
        want_logits, want_grads = solo[name]
        assert_close(logits[starts[i]:starts[i + 1]].detach(), want_logits, atol=2e-5, rtol=1e-5, what=name)
        got = _lora_grads(peft_model, name)
        assert got.keys() == want_grads.keys() and got
        for k in got:
            scale = want_grads[k].abs().max().item()
            assert_close(got[k], want_grads[k], atol=2e-5 * max(scale, 1e-6), rtol=0, what=k)


def test_refusals_name_the_problem(peft_model, tiny_path):
    with pytest.raises(multi_lora.MultiLoRAError, match=r"has no adapter zz"):
        multi_lora.attach(peft_model, ["a", "zz"])
    multi = multi_lora.attach(peft_model, ["a", "b"])
    ids = torch.randint(4, 300, (3, 8))
    with pytest.raises(multi_lora.MultiLoRAError, match=r"outside `with multi.rows"):
        peft_model(input_ids=ids)
    with pytest.raises(multi_lora.MultiLoRAError, match=r"the batch has 3 sequences, the rows say 2"):
        with multi.rows([1, 1]):
            peft_model(input_ids=ids)
    with pytest.raises(multi_lora.MultiLoRAError, match=r"one sequence count >= 0 per adapter"):
        with multi.rows([3]):
            pass
    multi.detach()
    peft_model(input_ids=ids)  # PEFT's own forward again

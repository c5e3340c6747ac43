"""fastft merge on the tiny model: LoRA and DoRA, from 4-bit and 16-bit runs, into fp32/fp16/bf16.

What is checked, independently of merge's own verification: the merged checkpoint loads with plain
transformers (no PEFT), holds no adapter weights, and its logits equal the unquantized base +
adapter (PEFT, fp32) within merge.TOLERANCE[dtype] x max(1, max |logit|) (each limit follows the
dtype's precision). For a 4-bit run the merged model is *not* the 4-bit training model: it differs
from NF4 base + adapter by the NF4 rounding of the base (large for this random tiny model, whose
Gaussian weights NF4 rounds coarsely), far more than the merge error, and the test asserts exactly
that; --from-quantized gives the 4-bit model (within the fp32 limit)."""
import json

import pytest

from support import assert_close, tiny_recipe_dict
from fastft import merge, recipe, registry, train

pytestmark = pytest.mark.slow

CASES = {  # name: (use_dora, load_in_4bit, merged dtype)
    "lora-4bit": (False, True, "bf16"),
    "lora-16bit": (False, False, "fp32"),
    "dora-4bit": (True, True, "fp32"),
    "dora-16bit": (True, False, "fp16"),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = {}
    for name, (dora, q4, _) in CASES.items():
        d = tmp_path_factory.mktemp(name)
        # a few steps at a high lr: enough to move the model far beyond the tolerances (asserted below)
        r = recipe.from_dict(tiny_recipe_dict(d / "run", model={"load_in_4bit": q4}, lora={"use_dora": dora},
                                              data={"max_examples": 48, "eval_fraction": 0.0},
                                              train={"max_steps": 4, "batch_size": 4, "lr": 1e-2}))
        train.run(r, log=lambda m: None)
        out[name] = d / "run"
    return out


def _batch(tokenizer):
    return tokenizer(["<|user|> classify red , blue , green <|end|> <|assistant|>", "hello there , how are you"],
                     return_tensors="pt", padding=True)


def _reference(run_dir, batch):
    """fp32 unquantized base + the adapter through PEFT (unmerged), and the bare base."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    info = json.loads((run_dir / "fastft.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(info["base_model"]["path"], dtype=torch.float32)
    model = PeftModel.from_pretrained(base, run_dir / "adapter").eval()
    with torch.no_grad():
        ref = model(**batch).logits
        with model.disable_adapter():
            bare = model(**batch).logits
    return ref, bare


@pytest.mark.parametrize("case", list(CASES))
def test_merged_checkpoint_equals_base_plus_adapter(case, runs, tmp_path):
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dora, q4, dtype = CASES[case]
    ref_arg, reg = str(runs[case]), None
    if case == "dora-16bit":  # one case goes through a registry reference
        reg = tmp_path / "registry"
        registry.Registry(reg).push(runs[case], "tiny-dora")
        registry.Registry(reg).promote("tiny-dora@v1", "production")
        ref_arg = "tiny-dora@production"
    logs = []
    out = tmp_path / "merged"
    report = merge.merge(ref_arg, out, dtype=dtype, registry=reg, log=logs.append)

    # plain transformers, no PEFT: the saved dtype, no adapter tensors left
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template and (out / "config.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(out)
    want = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    assert {p.dtype for p in model.parameters()} == {want}
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if "lora" in k or "magnitude" in k]

    batch = _batch(tok)
    ref, bare = _reference(runs[case], batch)
    with torch.no_grad():
        got = model.eval()(**batch).logits.float()
    tol = merge.TOLERANCE[dtype] * max(1.0, ref.abs().max().item())
    assert_close(got, ref, atol=tol, rtol=0, what=f"{case} merged {dtype} vs base + adapter")
    assert (bare - ref).abs().max() > 10 * tol  # the adapter changes the model far beyond the tolerance

    v = report["verify"]
    assert v["passed"] and v["relative_to_scale"] <= merge.TOLERANCE[dtype]
    assert json.loads((out / "fastft-merge.json").read_text())["adapter"] == ("DoRA" if dora else "LoRA")
    if q4:  # the 4-bit training model differs by NF4's rounding of the base, not by the merge
        gap = report["vs_4bit_training_model"]["max_abs_diff"]
        print(f"{case}: merge error {v['max_abs_diff']:.3g}, 4-bit training model vs merged {gap:.3g}")
        assert gap > 5 * v["max_abs_diff"] and gap > 0.1
        assert any("NF4 rounding of the base, not a merge error" in m for m in logs)


def test_from_quantized_equals_the_4bit_model_and_warns(runs, tmp_path):
    logs = []
    report = merge.merge(str(runs["lora-4bit"]), tmp_path / "m", dtype="fp32", from_quantized=True,
                         log=logs.append)
    assert any("--from-quantized" in m and "rounding error" in m for m in logs)
    g = report["vs_4bit_training_model"]
    assert g["relative_to_scale"] < merge.TOLERANCE["fp32"] and g["argmax_agreement"] == 1.0
    assert report["verify"]["passed"]
    with pytest.raises(merge.MergeError, match="trained on a 16-bit base"):
        merge.merge(str(runs["lora-16bit"]), tmp_path / "m2", dtype="fp32", from_quantized=True, log=logs.append)


def test_refusals(runs, tmp_path, tiny_path, capsys):
    from fastft import cli
    from test_compat import write_base

    other = write_base(tiny_path, tmp_path / "other-seed", seed=1)
    run = str(runs["lora-16bit"])
    rc = cli.main(["merge", run, "--out", str(tmp_path / "m"), "--base", other])
    err = capsys.readouterr().err
    assert rc == 2 and "weights differ" in err and "--force" in err, err
    assert not (tmp_path / "m").exists()
    # a pre-quantized 4-bit base has no 16-bit weights to merge into
    with pytest.raises(merge.MergeError, match="pre-quantized 4-bit checkpoint.*--base PATH.*--from-quantized"):
        merge.merge(str(runs["lora-4bit"]), tmp_path / "m", base="synthetic:fastft-tiny", force=True,
                    log=lambda m: None)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(merge.MergeError, match="not empty.*--overwrite"):
        merge.merge(run, tmp_path / "full", log=lambda m: None)

"""End to end on CPU: a real 4-bit QLoRA run of the tiny model through the hf backend."""
import json
import subprocess
import sys

import pytest

from support import assert_close, tiny_recipe_dict
from fastft import recipe, train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    # backend auto: hf on CPU; the evaluation at the end answers 20 held-out questions, base and adapter
    r = recipe.from_dict(tiny_recipe_dict(out, eval={"max_examples": 20, "max_new_tokens": 16}))
    logs = []
    import warnings

    with warnings.catch_warnings():
        # bitsandbytes' CPU inference layout would route training through a kernel without
        # autograd; fastft turns it off (backends.keep_4bit_trainable_on_cpu), so this must not fire
        warnings.filterwarnings("error", message=".*autograd kernel was not registered.*")
        result = train.run(r, log=logs.append)
    return r, out, result, logs, train


def test_loss_falls_and_metrics_improve(run):
    _, _, result, _, _ = run
    m = result.info["metrics"]
    losses = m["losses"]
    assert len(losses) >= 5
    assert losses[-1] < 0.5 * losses[0], losses
    assert m["after"]["eval_loss"] < 0.5 * m["before"]["eval_loss"]
    task = result.info["eval"]["task"]
    assert task["n"] == 20 and task["adapter"]["exact_match"] > task["base"]["exact_match"]
    assert m["steps"] == 40


def test_4bit_weights_keep_their_training_layout_after_eval(run):
    _, _, result, _, _ = run
    states = [m.weight.quant_state for m in result.model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    assert len(states) == 28
    assert not any(getattr(s, "packing_format_for_cpu", False) for s in states)
    assert all(s.nested for s in states)  # double quantization intact


def test_meter_reports_throughput_and_peak_memory(run):
    _, out, result, logs, _ = run
    t = result.info["metrics"]["train"]
    assert t["tokens_per_second"] > 0 and t["peak_rss_gb"] > 0.1 and t["train_tokens"] > 0
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [l for l in lines if "loss" in l]
    assert len(steps) >= 5 and all("tokens_per_second" in l and "peak_rss_gb" in l for l in steps)
    assert any("run summary" in l and "tokens/s" in l and "peak RSS" in l for l in logs)
    assert any("run summary" in l and "exact match (n=20)" in l for l in logs)  # base vs adapter
    # real tokens only: the meter's count equals the non-padding tokens of 40 batches of 8 examples
    assert t["train_tokens"] == sum(l["tokens_seen"] for l in lines[-1:])


def test_run_info_records_what_a_rerun_needs(run):
    r, out, _, _, _ = run
    info = json.loads((out / "fastft.json").read_text())
    assert info["schema_version"] == 1
    assert info["recipe"] == r.to_dict()
    assert info["backend"]["name"] == "hf" and "no CUDA" in info["backend"]["reason"]
    for pkg in ("torch", "transformers", "peft", "trl", "bitsandbytes", "fastft"):
        assert info["versions"][pkg]
    assert "unsloth" in info["versions"]
    assert info["data"]["hash"].startswith("sha256:")
    assert {"before", "after", "train", "losses"} <= set(info["metrics"])


def test_adapter_reloads_in_plain_peft_with_identical_logits(run):
    import torch
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    _, out, result, _, _ = run
    adapter = out / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "adapter_config.json").is_file()
    cfg = PeftConfig.from_pretrained(adapter)
    assert cfg.r == 8 and cfg.lora_alpha == 16
    base = AutoModelForCausalLM.from_pretrained(
        cfg.base_model_name_or_path, dtype=torch.float32,
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32))
    # train mode (dropout is 0, so it computes the same function): in eval mode bitsandbytes' CPU
    # backend would switch the plain reload to its bf16-absmax inference layout, ~0.09 off here
    reloaded = PeftModel.from_pretrained(base, adapter).train()
    tok = AutoTokenizer.from_pretrained(adapter)
    batch = tok(["<|user|> classify red , blue <|end|> <|assistant|>", "hello there"], return_tensors="pt",
                padding=True)
    trained = result.model.train()
    with torch.no_grad():
        expected = trained(**batch).logits
        got = reloaded(**batch).logits
    assert_close(got, expected, atol=1e-5, rtol=1e-5, what="logits")
    # and the adapter matters: the bare base model gives different logits
    with torch.no_grad(), reloaded.disable_adapter():
        bare = reloaded(**batch).logits
    assert (bare - expected).abs().max() > 1e-2


def test_cli_train_and_errors(tmp_path):
    import yaml

    cfg = tiny_recipe_dict(tmp_path / "out", backend="hf", train={"max_steps": 3})
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cli = [sys.executable, "-m", "fastft.cli"]
    ok = subprocess.run(cli + ["train", str(path), "--set", "lora.r=4"], capture_output=True, text=True, cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "backend hf (requested in the recipe (backend: hf))" in ok.stdout
    assert json.loads((tmp_path / "out" / "fastft.json").read_text())["recipe"]["lora"]["r"] == 4
    bad = subprocess.run(cli + ["train", str(path), "--set", "lora.rank=4"], capture_output=True, text=True)
    assert bad.returncode == 2 and "lora.rank: unknown key; did you mean 'lora.r'?" in bad.stderr
    missing = subprocess.run(cli + ["train", str(tmp_path / "nope.yaml")], capture_output=True, text=True)
    assert missing.returncode == 2 and "recipe not found" in missing.stderr


def test_kernels_fastft_trains_like_stock_peft_and_saves_plain_peft_adapters(tmp_path):
    """The whole model: QLoRA steps with fastft's fused LoRA (Triton; the CPU interpreter here) and with
    stock PEFT give the same per-step losses, and both adapters reload in plain PEFT with one function."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from fastft.kernels import lora

    small = {"batch_size": 2, "max_steps": 3, "logging_every": 1}  # the interpreter: ~5 s per step here
    data_ = {"max_examples": 24, "eval_fraction": 0.0}
    runs = {}
    for mode in ("fastft", "none"):
        logs = []
        # fp32 compute on a GPU too (IEEE dots in the kernels), so the comparison stays tight there
        r = recipe.from_dict(tiny_recipe_dict(tmp_path / mode, kernels=mode, train=small, data=data_,
                                              model={"dtype": "float32"}))
        torch.manual_seed(0)  # PEFT draws lora_A's initial values from the global RNG when the model loads
        runs[mode] = (train.run(r, log=logs.append), logs)
    fused, stock = runs["fastft"][0], runs["none"][0]
    assert any("fastft fused LoRA on 28 of 28 LoRA layers" in m for m in runs["fastft"][1]), runs["fastft"][1]
    assert any("kernels none: peft LoRA path" in m for m in runs["none"][1])
    if not torch.cuda.is_available():
        assert lora.interpreted()  # conftest turns the interpreter on: the Triton kernels ran, not the reference
    got, want = fused.info["metrics"]["losses"], stock.info["metrics"]["losses"]
    assert len(got) == len(want) == 3
    # fp32 compute: the fused kernels and PEFT differ only in summation order (measured ~1e-7 relative)
    assert_close(torch.tensor(got), torch.tensor(want), atol=0, rtol=1e-5, what="per-step losses")

    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(tmp_path / "none" / "adapter")
    batch = tok(["<|user|> classify red , blue <|end|> <|assistant|>"], return_tensors="pt")
    logits = {}
    for mode, (result, _) in runs.items():
        base = AutoModelForCausalLM.from_pretrained(result.info["backend"]["model_path"], dtype=torch.float32,
                                                    quantization_config=bnb)
        reloaded = PeftModel.from_pretrained(base, tmp_path / mode / "adapter").train()  # train: see above
        tol = 1e-4 if torch.cuda.is_available() else 1e-5  # a GPU run reloads through other fp32 kernels
        with torch.no_grad():
            logits[mode] = reloaded(**batch.to(reloaded.device)).logits.cpu()
            if mode == "fastft":  # the patched model in memory computes what plain PEFT reloads
                in_memory = result.model.train()(**batch.to(result.model.device)).logits.cpu()
                assert_close(in_memory, logits[mode], atol=tol, rtol=tol, what="fused in memory vs plain PEFT reload")
    assert_close(logits["fastft"], logits["none"], atol=1e-4, rtol=1e-4, what="fastft vs stock adapters")


def test_early_stopping_stops_when_eval_loss_stalls(tmp_path):
    # a vanishing lr cannot improve the held-out loss; the evaluation before training is the first
    # point of comparison, so with patience 2 the evaluations at steps 5 and 10 end the run
    r = recipe.from_dict(tiny_recipe_dict(tmp_path, train={"lr": 1e-12, "max_steps": 40, "eval_every": 5,
                                                           "early_stopping_patience": 2, "warmup_ratio": 0.0}))
    logs = []
    result = train.run(r, log=logs.append)
    assert result.info["metrics"]["steps"] == 10, result.info["metrics"]["steps"]
    assert any("early stop at step 10" in m for m in logs)


def test_the_saved_adapter_is_the_best_evaluated_one(tmp_path):
    # a learning rate far too high makes training diverge after it first helps: the adapter saved
    # is the one from the evaluation with the lowest held-out loss, not the last one
    r = recipe.from_dict(tiny_recipe_dict(tmp_path, train={"lr": 0.3, "max_steps": 30, "eval_every": 5,
                                                           "warmup_ratio": 0.0, "scheduler": "constant"}))
    logs = []
    result = train.run(r, log=logs.append)
    m = result.info["metrics"]
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [h for h in lines if "eval_loss" in h and h["step"] > 0]
    best = min(evals, key=lambda h: h["eval_loss"])
    assert m["adapter_step"] == best["step"]
    assert m["after"]["eval_loss"] == pytest.approx(best["eval_loss"], rel=1e-5)
    if best["step"] != m["steps"]:
        assert any(f"restored the best adapter, from step {best['step']}" in line for line in logs)


def test_best_adapter_callback_restores_the_best_weights(tmp_path):
    import torch
    from types import SimpleNamespace

    from fastft.models import backends

    model, _, _ = backends.load(recipe.from_dict(tiny_recipe_dict(tmp_path)))
    from fastft import callbacks  # after the backend: it imports transformers
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    logs = []
    path = tmp_path / "best.safetensors"
    cb = callbacks.BestAdapter(model, path, True, logs.append)

    def evaluate(step, loss):
        cb.on_evaluate(None, SimpleNamespace(global_step=step), None, metrics={"eval_loss": loss})

    evaluate(0, 5.0)  # the base model, before training: never restored
    with torch.no_grad():
        for p in params.values():
            p.add_(0.5)
    evaluate(5, 1.0)
    best = {n: p.detach().clone() for n, p in params.items()}
    with torch.no_grad():
        for p in params.values():
            p.add_(0.25)
    evaluate(10, 2.0)  # worse: not kept
    assert cb.restore_if_better(3.0)
    assert all(torch.equal(params[n], best[n]) for n in params)
    assert "restored the best adapter, from step 5 (held-out loss 1.0000 < 3.0000 at the end)" in logs[-1]
    assert not cb.restore_if_better(0.5)  # the final state is better: keep it
    # a resumed run reads the best adapter back from disk
    again = callbacks.BestAdapter(model, path, True, logs.append)
    assert (again.step, again.loss) == (5, 1.0)
    assert all(torch.equal(again.weights[n], best[n]) for n in params)

"""The benchmark harness: synthetic models, bench.train on CPU, bench.compare, bench.report, bench/gpu.sh."""
from __future__ import annotations

import importlib.util
import json
import os
import resource
import signal
import subprocess
import sys

import pytest
from support import ROOT

LLAMA3_8B_PARAMS = 8_030_261_248  # the published parameter count of Meta-Llama-3-8B
LLAMA32_1B_PARAMS = 1_235_814_400  # Llama-3.2-1B (tied embeddings)


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


# --- synthetic models ------------------------------------------------------------------------------

def test_synthetic_llama3_8b_on_meta_has_the_real_parameter_count_without_memory():
    from fastft.models import named

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB, the peak so far
    model = named.synthetic_on_meta("synthetic:llama-3-8b")
    assert named.count_parameters(model) == LLAMA3_8B_PARAMS
    assert {p.device.type for p in model.parameters()} == {"meta"}
    grew_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    assert grew_mb < 300, f"building on meta raised peak RSS by {grew_mb:.0f} MB (16 GB would be materialized weights)"
    assert named.count_parameters(named.synthetic_on_meta("llama-3.2-1b")) == LLAMA32_1B_PARAMS


def test_flops_formula_counts_every_linear_weight_of_the_model():
    from bench.train import flops_per_token
    from fastft.models import named

    model = named.synthetic_on_meta("synthetic:llama-3-8b")
    linear = sum(m.weight.numel() for m in model.modules() if m.__class__.__name__ == "Linear")
    f = flops_per_token(model.config, n_lora=1000, tokens_per_row=2048)
    assert f["n_linear"] == linear  # q,k,v,o,gate,up,down in 32 layers + lm_head
    cfg = model.config
    assert f["flops_per_token"] == 4 * linear + 6 * 1000 + 6 * cfg.num_hidden_layers * 2048 * cfg.hidden_size


def test_unknown_synthetic_architecture_names_the_choices():
    from fastft.models import named

    with pytest.raises(ValueError, match="synthetic:llama-3-8b"):
        named.resolve("synthetic:llama-9-400b")


def test_synthetic_tiny_is_a_prequantized_nf4_checkpoint(fastft_cache):
    import torch
    from transformers import AutoModelForCausalLM

    from fastft.models import named

    path = named.resolve("synthetic:fastft-tiny")
    assert named.resolve("synthetic:fastft-tiny") == path  # cached
    cfg = json.loads((ROOT / "fastft/assets/tiny-llama/config.json").read_text())
    saved = json.loads(open(os.path.join(path, "config.json")).read())
    assert saved["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    assert saved["quantization_config"]["bnb_4bit_use_double_quant"] is True
    assert json.loads(open(os.path.join(path, "fastft-synthetic.json")).read())["weights"].startswith("synthetic weights")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, device_map={"": "cpu"})
    q = model.model.layers[0].self_attn.q_proj
    assert q.__class__.__name__ == "Linear4bit" and q.weight.quant_state.nested  # double quantization
    assert named.count_parameters(model) == named.count_parameters(named.synthetic_on_meta("fastft-tiny"))
    assert model.config.hidden_size == cfg["hidden_size"]
    bf16 = named.resolve("synthetic:fastft-tiny", load_in_4bit=False)  # 16-bit LoRA: a bf16 checkpoint
    assert bf16 != path and "quantization_config" not in json.loads(open(os.path.join(bf16, "config.json")).read())
    dense = AutoModelForCausalLM.from_pretrained(bf16, dtype=torch.bfloat16)
    assert named.count_parameters(dense) == named.count_parameters(model)


# --- bench.train on CPU ----------------------------------------------------------------------------

@pytest.mark.slow
def test_bench_train_cpu_writes_every_field(tmp_path):
    out = tmp_path / "results"
    cmd = [sys.executable, "-m", "bench.train", "recipes/bench-tiny-cpu.yaml", "--target", "cpu",
           "--steps", "2", "--warmup", "1", "--set", "model.name=synthetic:fastft-tiny",
           "--set", "model.max_seq_length=64", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    last = json.loads(proc.stdout.strip().splitlines()[-1])  # the result, as the last line of stdout
    files = sorted(out.iterdir())
    doc = json.loads(next(f for f in files if f.suffix == ".json").read_text())
    assert doc == last
    assert {".json", ".md", ".png"} <= {f.suffix for f in files}
    for key in ("schema_version", "kind", "name", "target", "device", "versions", "config", "metrics", "notes",
                "command", "created_utc"):
        assert key in doc, key
    assert doc["kind"] == "train" and doc["target"] == "cpu" and doc["device"]["type"] == "cpu"
    assert doc["config"]["weights"] == "synthetic weights"
    for key in ("torch", "transformers", "peft", "bitsandbytes", "fastft", "git_sha"):
        assert key in doc["versions"]
    (run,) = doc["metrics"]["runs"]
    assert run["status"] == "ok", run.get("message")
    m = run["metrics"]
    assert m["tokens_per_second"] > 0 and m["measured_steps"] == 2 and m["warmup_steps"] == 1
    assert m["measured_tokens"] == 2 * 4 * 64  # 2 steps x batch 4 x every row a full 64 real tokens
    assert len(run["steps"]) == run["steps_done"] == 3 and len(m["losses"]) == 3  # every step, as it was written
    assert not run["cut"] and run["compile_regime"] and run["kernels_report"]
    for key in ("step_seconds_median", "step_seconds_min", "step_seconds_max", "step_seconds_stdev",
                "step_seconds_spread_pct", "peak_rss_gb", "flops"):
        assert m[key] is not None, key
    assert m["mfu"] is None  # no MFU on a CPU
    assert "synthetic weights" in " ".join(run["backend_info"]["notes"])
    assert "tokens/s" in (out / next(f.name for f in files if f.suffix == ".md")).read_text()


def test_bench_train_gpu_target_without_gpu_is_a_clear_error():
    from bench import train as bench_train

    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert bench_train.main(["recipes/bench-tiny-cpu.yaml", "--target", "h100"]) == 2


def test_runs_are_parsed_in_order_without_duplicates():
    import argparse

    from bench.train import parse_runs
    from fastft import recipe

    r = recipe.load(ROOT / "recipes/bench-llama3-8b.yaml")
    args = argparse.Namespace(run=["hf", "unsloth:fastft", "hf"], backend=["unsloth"], kernels=["unsloth", "fastft"])
    assert parse_runs(args, r) == [("hf", "auto"), ("unsloth", "fastft"), ("unsloth", "unsloth")]
    with pytest.raises(SystemExit, match="unknown run"):
        parse_runs(argparse.Namespace(run=["tf:xla"], backend=None, kernels=None), r)


# --- bench.compare ---------------------------------------------------------------------------------

def _doc(tps=1000.0, alloc=10.0, reserved=12.0, runs=(("hf", "auto"), ("unsloth", "unsloth")), status="ok"):
    return {
        "schema_version": 1, "kind": "train", "name": "bench-llama3-8b", "target": "h100",
        "device": {"type": "cuda", "name": "NVIDIA H100 80GB HBM3"},
        "config": {"model": "synthetic:llama-3-8b", "max_seq_length": 2048, "batch_size": 2, "grad_accum": 4},
        "metrics": {"runs": [{"backend": b, "kernels": k, "target": "h100", "status": status,
                              "metrics": {"tokens_per_second": tps, "peak_vram_allocated_gb": alloc,
                                          "peak_vram_reserved_gb": reserved}} for b, k in runs]},
        "command": "python -m bench.train ...", "created_utc": "2026-11-26T10:00:00Z",
    }


def _compare(tmp_path, new, base, *extra):
    from bench import compare

    (tmp_path / "new.json").write_text(json.dumps(new))
    (tmp_path / "base.json").write_text(json.dumps(base))
    return compare.main([str(tmp_path / "new.json"), "--baseline", str(tmp_path / "base.json"), *extra])


def test_compare_fails_a_10_percent_slowdown_and_passes_2_percent(tmp_path, capsys):
    assert _compare(tmp_path, _doc(tps=900.0), _doc(), "--tolerance", "5%") == 1
    out = capsys.readouterr().out
    assert "FAIL tokens_per_second" in out and "-10.0%" in out
    assert _compare(tmp_path, _doc(tps=980.0), _doc(), "--tolerance", "5%") == 0
    assert "PASS" in capsys.readouterr().out
    assert _compare(tmp_path, _doc(tps=1500.0), _doc(), "--tolerance", "5%") == 0  # faster is fine


def test_compare_fails_a_memory_rise(tmp_path, capsys):
    assert _compare(tmp_path, _doc(reserved=13.0), _doc(), "--tolerance", "5%") == 1
    assert "FAIL peak_vram_reserved_gb" in capsys.readouterr().out
    assert _compare(tmp_path, _doc(alloc=10.4), _doc(), "--tolerance", "0.05") == 0
    assert _compare(tmp_path, _doc(alloc=9.0), _doc(), "--tolerance", "5") == 0  # less memory is fine


def test_compare_reports_unmatched_configs(tmp_path, capsys):
    new = _doc(runs=(("hf", "auto"), ("unsloth", "fastft")))
    assert _compare(tmp_path, new, _doc()) == 1
    out = capsys.readouterr().out
    assert "MISSING bench-llama3-8b [h100] unsloth:unsloth" in out
    assert "NEW bench-llama3-8b [h100] unsloth:fastft" in out
    assert _compare(tmp_path, new, _doc(), "--allow-missing") == 0


def test_compare_fails_when_a_run_no_longer_fits(tmp_path, capsys):
    assert _compare(tmp_path, _doc(status="does not fit"), _doc()) == 1
    assert "does not fit" in capsys.readouterr().out


def test_compare_usage_errors_exit_2(tmp_path, capsys):
    from bench import compare

    assert compare.main([str(tmp_path / "nope.json"), "--baseline", str(tmp_path / "b.json")]) == 2
    (tmp_path / "x.json").write_text(json.dumps({"hello": 1}))
    assert compare.main([str(tmp_path / "x.json"), "--baseline", str(tmp_path / "x.json")]) == 2
    with pytest.raises(SystemExit):
        compare.main([str(tmp_path / "x.json"), "--baseline", "b", "--tolerance", "lots"])


def test_write_baseline_merges_runs(tmp_path, capsys):
    from bench import compare

    base = tmp_path / "baselines" / "h100.json"
    (tmp_path / "a.json").write_text(json.dumps(_doc(tps=1000.0)))
    (tmp_path / "b.json").write_text(json.dumps(_doc(tps=1100.0, runs=(("hf", "auto"),))))
    assert compare.main([str(tmp_path / "a.json"), "--baseline", str(base), "--write-baseline"]) == 0
    assert compare.main([str(tmp_path / "b.json"), "--baseline", str(base), "--write-baseline"]) == 0
    runs = json.loads(base.read_text())["runs"]
    assert sorted((r["backend"], r["metrics"]["tokens_per_second"]) for r in runs) == [("hf", 1100.0), ("unsloth", 1000.0)]
    assert compare.main([str(tmp_path / "b.json"), "--baseline", str(base), "--allow-missing"]) == 0


# --- bench.report ----------------------------------------------------------------------------------

def test_report_rewrites_only_the_marked_readme_section(tmp_path, capsys):
    from bench import report

    results = tmp_path / "results"
    results.mkdir()
    doc = _doc(runs=(("unsloth", "unsloth"),))
    doc["metrics"]["runs"][0]["metrics"].update(step_seconds_median=4.2, mfu=0.41)
    doc["config"]["weights"] = "synthetic weights"
    (results / "train-bench-llama3-8b-h100-20261126T100000Z.json").write_text(json.dumps(doc))
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n## Benchmarks\n\n{report.BEGIN}\nold table\n{report.END}\n\n## Tests\nkeep me\n")
    args = ["--results", str(results), "--readme", str(readme)]
    assert report.main(args + ["--check"]) == 1
    assert report.main(args) == 0
    text = readme.read_text()
    assert "old table" not in text and text.endswith("## Tests\nkeep me\n") and text.startswith("# x\n")
    assert "| bench-llama3-8b (seq 2048, batch 2x4) | h100 | NVIDIA H100 80GB HBM3 | unsloth + unsloth kernels | 1,000 |" in text
    assert "41.0%" in text and "python -m bench.train" in text
    assert report.main(args + ["--check"]) == 0
    readme.write_text("no markers\n")
    with pytest.raises(SystemExit, match="bench:begin"):
        report.main(args)


def test_readme_benchmark_table_is_up_to_date():
    from bench import report

    assert report.main(["--check"]) == 0, "run: python -m bench.report"


# --- the GPU suite's rehearsal: tests/test_gpu_suite.py -------------------------------------------

# --- bench.static: what the compiled kernels' machine code says ----------------------------------------

SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_1:
        /*0010*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0020*/                   HMMA.16816.F32.BF16 R8, R4, R6, R8 ;
.L_x_2:
        /*0030*/                   IADD3 R0, R0, 0x1, RZ ;
        /*0040*/              @P0 BRA `(.L_x_2) ;
        /*0050*/                   HMMA.16816.F32.BF16 R12, R4, R6, R12 ;
        /*0060*/              @!P1 BRA `(.L_x_1) ;
        /*0070*/                   EXIT ;
.L_x_3:
        /*0080*/                   BRA `(.L_x_3);
"""


def test_static_finds_the_k_loop_by_its_back_edge_and_counts_mmas():
    from bench import static

    s = static.sass_loops(SASS)
    assert s["instructions"] == 9 and s["mma_total"] == 2
    # two loops (the inner one has no MMA); the trailing self-branch after EXIT is no loop
    assert sorted(lp["instructions"] for lp in s["loops"]) == [2, 6]
    assert s["k_loop"]["start"] == "0x0010" and s["k_loop"]["mma"] == 2
    assert s["per_k_step"] == 6 and s["per_mma"] == 3.0


def test_static_workloads_bytes_flops_and_roofline():
    from bench import static

    rows = {(w["kind"], w["shape"], w.get("path"), w.get("phase")): w for w in static.workloads(4.3e12, 790e12)}
    dq = rows[("nf4_dequant", "q_proj/o_proj", None, None)]
    n = 4096 * 4096
    # packed codes + uint8 absmax per 64 + fp32 absmax2 per 256 blocks + the code table, then the bf16 output
    assert dq["bytes"] == n // 2 + n // 64 + 4 * (n // 64 // 256) + 1024 + 2 * n
    assert dq["bound"] == "memory" and dq["lower_bound_us"] == pytest.approx(dq["bytes"] / 4.3e12 * 1e6, abs=0.01)
    fwd = rows[("lora_layer", "gate/up_proj", "in_kernel", "forward")]
    assert fwd["flops"] == 2 * 4096 * 14336 * 4096 + 2 * 4096 * 4096 * 16 + 2 * 4096 * 16 * 14336
    assert fwd["bound"] == "compute"
    deq = rows[("lora_layer", "gate/up_proj", "dequantize", "forward")]
    assert deq["bytes"] - fwd["bytes"] == 2 * 2 * 14336 * 4096  # the bf16 W written, then read
    assert ("lora_layer", "lm_head", "in_kernel", "forward") not in rows


def test_nf4_benchmark_time_budget_cuts_and_writes_each_case(tmp_path):
    env = _env()
    env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, "-m", "bench.kernels", "nf4", "--cpu-smoke", "--dtypes", "bf16",
                           "--no-torch", "--time-budget", "0", "--out", str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(proc.stdout.strip().splitlines()[-1])
    assert doc["metrics"]["rows"] == [] and doc["metrics"]["complete"]
    assert [c["shape"] for c in doc["metrics"]["cut"]] == [[64, 128], [96, 200]]
    assert len(list(tmp_path.glob("kernel-nf4-dequant-smoke-cpu-*.json"))) == 1  # one file, rewritten


def test_static_rejects_a_tree_without_kernels(tmp_path, capsys):
    from bench import static

    assert static.main(["--tree", str(tmp_path), "--out", str(tmp_path)]) == 2
    assert "pass --tree a fastft checkout" in capsys.readouterr().err


@pytest.mark.unsloth
@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("unsloth") is None,
                    reason="unsloth not installed here; `make test` runs these in .venv-unsloth")
def test_bench_train_unsloth_loads_the_synthetic_nf4_checkpoint(tmp_path):
    """The path the GPU suite takes for Llama-3-8B, on the tiny architecture: Unsloth's
    FastLanguageModel.from_pretrained on fastft's pre-quantized synthetic checkpoint."""
    cmd = [sys.executable, "-m", "bench.train", "recipes/bench-tiny-cpu.yaml", "--target", "cpu", "--run", "unsloth",
           "--steps", "1", "--warmup", "1", "--set", "model.name=synthetic:fastft-tiny",
           "--set", "model.max_seq_length=64", "--out", str(tmp_path), "--no-chart"]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = json.loads(proc.stdout.strip().splitlines()[-1])["metrics"]["runs"]
    assert run["status"] == "ok", run.get("message")
    assert run["backend_info"]["name"] == "unsloth" and run["metrics"]["measured_tokens"] == 4 * 64


@pytest.mark.parametrize("error, status", [
    ("oom", "does not fit"),  # torch's CUDA out-of-memory error, raised anywhere in the run
    ("wrapped", "does not fit"),  # fastft.train's TrainError raised from it (its OOM message)
    ("other", "error"),
])
def test_bench_worker_reports_out_of_memory_as_does_not_fit(tmp_path, monkeypatch, error, status):
    import torch

    from bench import train as bench_train
    from fastft import train

    def fail(recipe, log=print, **kw):
        if error == "oom":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if error == "wrapped":
            try:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory")
            except torch.cuda.OutOfMemoryError as e:
                raise train.TrainError("out of GPU memory (peak ...). Try: ...") from e
        raise ValueError("something else")

    monkeypatch.setattr(train, "run", fail)
    doc_path = tmp_path / "result.json"  # the parent writes it before the run, every run pending
    bench_train.common.write_json(doc_path, {"metrics": {"runs": [bench_train.pending_record("hf", "auto", "cpu", 2)]}})
    spec = {"recipe": str(ROOT / "recipes/bench-tiny-cpu.yaml"), "overrides": [], "target": "cpu", "backend": "hf",
            "kernels": "auto", "steps": 1, "warmup": 1, "data": "random", "work_dir": str(tmp_path),
            "doc_path": str(doc_path), "run_index": 0}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    from fastft import callbacks
    from fastft.models import patch

    apply, meter, sigint = patch.apply, callbacks.Meter, signal.getsignal(signal.SIGINT)
    assert bench_train.worker(str(tmp_path / "spec.json")) == 0
    # what the worker wraps to record a run is put back: a later run in this process checkpoints again
    assert (patch.apply, callbacks.Meter, signal.getsignal(signal.SIGINT)) == (apply, meter, sigint)
    out = json.loads(doc_path.read_text())["metrics"]["runs"][0]
    assert out["final"] and not out["cut"] and out["steps"] == []
    assert out["status"] == status and "peak_rss_gb" in out["metrics"]
    assert ("traceback" in out) == (status == "error")
    doc = {"name": "x", "target": "cpu", "device": {"type": "cpu", "name": "cpu"}, "command": "c",
           "config": {"model": "m", "weights": "w", "max_seq_length": 1, "batch_size": 1, "grad_accum": 1, "lora_r": 1},
           "metrics": {"runs": [out]}}
    assert f"| hf | {status} |" in bench_train.markdown_table(doc)


# --- overhead: plain libraries vs fastft ----------------------------------------------------------

def test_overhead_tiny_runs_both_sides_and_writes_one_result(tmp_path):
    out = tmp_path / "results"
    cmd = [sys.executable, "-m", "bench.overhead", "--tiny", "--steps", "2", "--repeats", "1", "--backend", "hf",
           "--max-length", "64", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env={**_env(), "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    last = json.loads(proc.stdout.strip().splitlines()[-1])  # the result, as the last line of stdout
    (path,) = out.glob("*.json")
    doc = json.loads(path.read_text())
    assert doc == last
    for key in ("schema_version", "kind", "name", "target", "device", "versions", "config", "metrics", "notes",
                "command", "created_utc"):
        assert key in doc, key
    assert (doc["kind"], doc["name"], doc["target"]) == ("overhead", "fastft-tiny", "cpu")
    assert doc["config"]["steps"] == 2 and doc["config"]["warmup"] == 1 and doc["config"]["repeats"] == 1
    runs = doc["metrics"]["runs"]
    assert [(r["side"], r["backend"]) for r in runs] == [("plain", "hf"), ("fastft", "hf")]
    for r in runs:
        assert r["status"] == "ok", r.get("message")
        # the same work on both sides: 1 timed step x batch 4 x every row a full 64 real tokens
        assert r["measured_steps"] == 1 and r["measured_tokens"] == 4 * 64, r
        assert len(r["per_step"]) == 2 and len(r["losses"]) == 2 and r["peak_rss_gb"] > 0
    pair = doc["metrics"]["pairs"]["hf"]
    assert pair["status"] == "ok"
    assert pair["plain"]["median"] == runs[0]["tokens_per_second"]
    assert pair["fastft"]["median"] == runs[1]["tokens_per_second"]
    assert pair["ratio"] == pytest.approx(runs[1]["tokens_per_second"] / runs[0]["tokens_per_second"])
    assert "fastft / plain" in proc.stdout

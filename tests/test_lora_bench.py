"""`python -m bench.kernels lora --cpu-smoke` runs end to end and labels itself as no measurement."""
import json

from support import ROOT


def test_lora_benchmark_cpu_smoke(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.syspath_prepend(str(ROOT))
    from bench import kernels

    assert kernels.main(["lora", "--cpu-smoke", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "not measurements and claim nothing" in out
    doc = json.loads(out.strip().splitlines()[-1])
    assert doc["name"] == "lora-linear-smoke" and doc["target"] == "cpu" and doc["config"]["cpu_smoke"]
    assert doc["notes"][0].startswith("interpreter smoke, not a measurement")
    rows = doc["metrics"]["rows"]
    assert not [r for r in rows if "error" in r]
    assert {r["impl"] for r in rows} == {"fastft", "fastft_dequant", "peft", "floor_matmul"}
    # the harness checks fastft against PEFT before timing: fp32 here, summation order only
    assert max(r["max_rel_diff_vs_peft"] for r in rows if r["impl"].startswith("fastft")) < 1e-5
    assert [p.name for p in tmp_path.iterdir()] == [p.name for p in tmp_path.glob("kernel-lora-linear-smoke-cpu-*.json")]
    # each fastft row records its NF4 path for forward and backward; the dequant row forces that path
    paths = {r["impl"]: r.get("nf4_path") for r in rows if r["base"] == "nf4"}
    assert not [r for r in rows if r["base"] != "nf4" and "nf4_path" in r]
    assert paths["fastft_dequant"] == {"forward": "dequantize", "backward": "dequantize"}
    assert paths["fastft"]["forward"] == paths["fastft"]["backward"]
    assert doc["metrics"]["complete"] and doc["metrics"]["cut"] == []


def test_lora_benchmark_time_budget_cuts_the_cases_left(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.syspath_prepend(str(ROOT))
    from bench import kernels

    assert kernels.main(["lora", "--cpu-smoke", "--time-budget", "0", "--out", str(tmp_path)]) == 0
    doc = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert doc["metrics"]["rows"] == [] and doc["config"]["time_budget_s"] == 0
    assert [(c["base"], c["K"], c["N"]) for c in doc["metrics"]["cut"]] == [
        ("nf4", 64, 96), ("nf4", 128, 40), ("16bit", 64, 96), ("16bit", 128, 40)]
    assert all("time budget 0 s" in c["reason"] for c in doc["metrics"]["cut"])

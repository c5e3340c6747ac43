"""`python -m bench.kernels lora --cpu-smoke` runs end to end, labels itself as no measurement, and
times both NF4 paths; NF4PathProbe reads the route from the kernel calls, not from a label."""
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
    # both NF4 paths are timed: each fastft row records the route its forward and backward took, read
    # from the kernel calls they made, and the two rows' routes differ
    paths = {(r["impl"], r["K"], r["N"]): r.get("nf4_path") for r in rows if r["base"] == "nf4"}
    assert not [r for r in rows if r["base"] != "nf4" and "nf4_path" in r]
    for (impl, K, N), path in paths.items():
        if impl == "fastft":
            assert path == {"forward": "in_kernel", "backward": "in_kernel"}, (K, N, path)
            assert path != paths[("fastft_dequant", K, N)]
        elif impl == "fastft_dequant":
            assert path == {"forward": "dequantize", "backward": "dequantize"}, (K, N, path)
        else:
            assert path is None
    assert doc["metrics"]["summary"]["nf4"]["nf4_paths"]["fastft"] == "in_kernel"
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


def test_nf4_path_probe_reads_the_route_from_the_kernel_calls(monkeypatch):
    """The probe sees what ran: with NF4_PATH forced to one path it reports that one for forward and
    backward, and a forward that never reaches the fused op is reported as not run."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.syspath_prepend(str(ROOT))
    import torch

    from bench.kernels_lora import NF4PathProbe, build_layer, fwd_bwd
    from fastft.models import patch
    from fastft.kernels import lora

    model, layer = build_layer(torch, 64, 96, 8, "nf4", torch.float32, "cpu")
    params = [p for p in model.parameters() if p.requires_grad]
    x = torch.randn(1, 24, 64).requires_grad_()
    dy = torch.randn(1, 24, 96)
    seen, before = {}, (lora.lora_forward, lora.lora_backward, lora.dense_weight, lora.lora_matmul)
    for path in lora.NF4_PATHS:
        with NF4PathProbe(lora) as probe:
            fwd_bwd(torch, lambda t: patch._fused_forward(layer, t), x, dy, params + [x], path)()
        seen[path] = probe.paths()
        assert seen[path] == {"forward": path, "backward": path}
    assert (lora.lora_forward, lora.lora_backward, lora.dense_weight, lora.lora_matmul) == before  # unwrapped
    with NF4PathProbe(lora) as probe:
        fwd_bwd(torch, lambda t: type(layer).forward(layer, t), x, dy, params + [x], None)()  # PEFT's own forward
    assert probe.paths() == {"forward": "not run", "backward": "not run"}

"""The CUDA and NCCL branches a CPU can still drive: each test stubs the torch.cuda / torch.distributed
calls a branch makes and checks what the branch does with their answers, so a misspelled call or
key there fails here instead of on the first GPU run. The stubs answer like an H100 (132 SMs,
80 GiB, sm_90).

What only a GPU can run (kernel launches, the benchmarks' timed regions) is listed in
docs/benchmarks.md ("What only a GPU executes"), from `python -m bench.coverage`.
"""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from support import tiny_recipe_dict

# imported before any stub: transformers (which fastft.callbacks and fastft.train import) probes
# CUDA as it imports and fails against a torch.cuda that claims a device
from bench import common, train as bench_train
from fastft import callbacks, cli, hardware, oom, recipe
from fastft.models import backends, sharded_load
from fastft.kernels import lora_configs, nf4

GiB = 1 << 30
H100 = SimpleNamespace(name="NVIDIA H100 80GB HBM3", major=9, minor=0, total_memory=80 * GiB,
                       multi_processor_count=132, shared_memory_per_block_optin=227 * 1024)


@pytest.fixture
def cuda(monkeypatch):
    """torch.cuda answering as one H100 would; records which device each query asked about."""
    asked = []

    def props(device=None):
        asked.append(device)
        return H100

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", props)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    return SimpleNamespace(asked=asked)


# --- peak memory and step timing (fastft.callbacks) ------------------------------------------------

def test_peak_memory_is_the_cuda_allocators_peaks(cuda, monkeypatch):
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: 3_500_000_000)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda *a: 4_250_000_000)
    assert callbacks.peak_memory() == {"peak_vram_allocated_gb": 3.5, "peak_vram_reserved_gb": 4.25}


@pytest.mark.parametrize("initialized, syncs", [(True, 2), (False, 0)])
def test_meter_synchronizes_before_each_clock_read(cuda, monkeypatch, tmp_path, initialized, syncs):
    # a step's time ends when its kernels have; a process that never touched CUDA must not start
    # the runtime just to synchronize it
    calls = []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: initialized)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: calls.append(a))
    meter = callbacks.Meter(tmp_path / "metrics.jsonl")
    meter.on_step_begin(None, SimpleNamespace(global_step=0), None)
    meter.count({"attention_mask": torch.ones(2, 5, dtype=torch.long)})
    meter.on_step_end(None, SimpleNamespace(global_step=1), None)
    assert len(calls) == syncs
    assert meter.totals()[0] == 10


@pytest.mark.parametrize("backend, device", [("nccl", "cuda"), ("gloo", "cpu")])
def test_all_reduce_puts_the_counters_on_the_backends_device(monkeypatch, backend, device):
    # NCCL reduces CUDA tensors only; gloo reduces CPU tensors
    devices = []
    real_tensor = torch.tensor

    def tensor(data, dtype=None, device=None):
        devices.append(device)
        return real_tensor(data, dtype=dtype)

    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda *a: 2)
    monkeypatch.setattr(dist, "get_backend", lambda *a: backend)
    monkeypatch.setattr(dist, "all_reduce", lambda t, *a, **k: t.mul_(2))  # the other rank holds the same
    monkeypatch.setattr(torch, "tensor", tensor)
    assert callbacks._all_reduce_sum([3.0, 1.5]) == [6.0, 3.0]
    assert devices == [device]


def test_out_of_memory_message_quotes_the_cuda_peaks(cuda, monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: 21_000_000_000)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda *a: 23_500_000_000)
    r = recipe.from_dict(tiny_recipe_dict(tmp_path))
    msg = oom.message(r, torch.cuda.OutOfMemoryError("CUDA out of memory"), tmp_path, callbacks.peak_memory())
    assert "peak 21.00 GB allocated / 23.50 GB reserved" in msg, msg
    assert "train.batch_size 8 -> 4 with train.grad_accum 1 -> 2" in msg, msg


# --- device, dtype and target ----------------------------------------------------------------------

@pytest.mark.parametrize("bf16, want", [(True, torch.bfloat16), (False, torch.float16)])
def test_auto_dtype_on_cuda_is_bf16_where_the_gpu_has_it(monkeypatch, bf16, want):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert backends.resolve_dtype("auto", "cuda:0") is want
    assert backends.resolve_dtype("auto", "cpu") is torch.float32
    assert backends.resolve_dtype("float16", "cuda:0") is torch.float16


@pytest.mark.parametrize("name, memory, target", [
    ("NVIDIA H200", 141 * GiB, "h100"),
    ("NVIDIA A100-SXM4-40GB", 40 * GiB, "a100-40"),
    ("NVIDIA GeForce RTX 4090", 24 * GiB, "rtx4090"),
])
def test_detect_target_reads_the_devices_name_and_memory(monkeypatch, name, memory, target):
    asked = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda d: asked.append(d) or SimpleNamespace(name=name, total_memory=memory))
    assert hardware.detect_target(1) == target
    assert asked == [1]


def test_fastft_info_prints_the_gpu(cuda, capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "  device        NVIDIA H100 80GB HBM3, sm_90, 80.0 GiB" in out, out
    assert cuda.asked == [0]


def test_bench_result_names_the_gpu(cuda):
    assert common.device() == {"type": "cuda", "name": "NVIDIA H100 80GB HBM3", "capability": "9.0",
                               "memory_bytes": 80 * GiB, "multiprocessors": 132}


# --- process groups (fastft.models.sharded_load) -----------------------------------------------------------

@pytest.mark.parametrize("device, backend, current", [("cuda:1", "nccl", [torch.device("cuda:1")]),
                                                      ("cpu", "gloo", [])])
def test_process_group_backend_follows_the_device(monkeypatch, device, backend, current):
    # NCCL needs each rank's current device set before the group forms (else every rank uses GPU 0)
    joined, set_to = [], []
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend=None, **k: joined.append(backend))
    monkeypatch.setattr(torch.cuda, "set_device", set_to.append)
    sharded_load.init_process_group(device)
    assert joined == [backend] and set_to == current


# --- SM counts for the kernels' grids (fastft.kernels) ----------------------------------------------

def test_lora_split_heuristic_reads_the_sm_count_once_per_device(cuda, monkeypatch):
    lora_configs._sm_count.cache_clear()
    try:
        assert lora_configs.device_sms(torch.device("cuda")) == 132  # no index: the current device (0)
        assert lora_configs.device_sms(torch.device("cuda", 0)) == 132  # the same device: cached
        assert lora_configs.device_sms(torch.device("cuda", 3)) == 132
        assert lora_configs.device_sms(torch.device("cpu")) is None
        assert cuda.asked == [0, 3]
    finally:
        lora_configs._sm_count.cache_clear()  # the H100 answer must not outlive the stub


def test_nf4_grid_cap_is_programs_per_sm_times_sms(cuda, monkeypatch):
    monkeypatch.setattr(nf4, "_SMS", {})
    assert nf4._max_programs(torch.device("cuda")) == 132 * nf4.PROGRAMS_PER_SM
    assert nf4._max_programs(torch.device("cuda", 0)) == 132 * nf4.PROGRAMS_PER_SM
    assert nf4._max_programs(torch.device("cuda", 2)) == 132 * nf4.PROGRAMS_PER_SM
    assert cuda.asked == [0, 2]


@pytest.mark.parametrize("kind, M, N, nf4, fp32, want", [
    ("mm", 4096, 4096, False, False, "mm_128x128x64_w8_s3"),
    ("mm", 128, 4096, False, False, "mm_64x64x64_w4_s3"),
    ("mm", 4096, 4096, True, False, "nf4_128x64x64_w4_s2"),
    ("mm", 4096, 256, True, False, "nf4_64x64x64_w4_s2"),
    ("mm", 4096, 4096, False, True, "f32_64x64x32_w4_s2"),
    ("thin", 4096, 16, False, False, "thin_64xRx64_w4_s3"),
    ("red", 16, 4096, False, False, "red_Rx128x64_w4_s3"),
    ("red", 16, 512, True, False, "red_Rx64x64_w4_s3"),
])
def test_lora_configs_picked_on_a_gpu_are_in_the_compiled_table(monkeypatch, kind, M, N, nf4, fp32, want):
    # the interpreter has its own configs; a GPU launch takes one of CONFIGS (each compile-checked)
    monkeypatch.setattr(lora_configs, "interpreted", lambda: False)
    assert lora_configs.pick_config(kind, M, N, nf4, fp32) == want
    assert want in lora_configs.CONFIGS


def test_lora_shared_memory_limit_is_the_devices_opt_in_maximum(cuda):
    lora_configs._smem_optin.cache_clear()
    try:
        assert lora_configs.smem_limit(torch.device("cuda")) == 227 * 1024
        assert lora_configs.smem_limit(torch.device("cuda", 0)) == 227 * 1024  # cached: no second query
        assert lora_configs.smem_limit(torch.device("cpu")) is None
        assert cuda.asked == [0]
    finally:
        lora_configs._smem_optin.cache_clear()


# --- the benchmark's memory cap (bench.train) -------------------------------------------------------

class _Stop(Exception):
    pass


@pytest.mark.parametrize("gpu_gib, fraction", [(80, 24 / 80), (24, None)])
def test_bench_worker_caps_memory_to_the_target(monkeypatch, tmp_path, gpu_gib, fraction):
    # an rtx4090 run on a bigger card is capped to 24 GiB; on a card no bigger it is not capped
    import signal

    capped = []
    monkeypatch.setattr(signal, "signal", lambda *a: None)  # the worker's SIGINT/SIGTERM handlers: not pytest's
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda d: SimpleNamespace(**{**vars(H100), "total_memory": gpu_gib * GiB}))
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, d=None: capped.append((f, d)))

    def stop(*a, **k):  # the run itself is the GPU's part: stop once the cap is set
        raise _Stop

    monkeypatch.setattr(recipe, "load", stop)
    doc = tmp_path / "doc.json"
    doc.write_text(json.dumps({"metrics": {"runs": [{"notes": []}]}}))
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"doc_path": str(doc), "run_index": 0, "target": "rtx4090", "backend": "hf",
                                "kernels": "none", "recipe": "x", "overrides": []}))
    with pytest.raises(_Stop):
        bench_train.worker(str(spec))
    assert capped == ([] if fraction is None else [(pytest.approx(fraction), 0)])


def test_bench_mfu_divides_by_the_gpus_bf16_peak():
    # MFU only for a bf16 run on a GPU the peak table names: tokens/s x FLOPs per token / peak
    cfg = SimpleNamespace(hidden_size=64, num_hidden_layers=2, vocab_size=256, num_attention_heads=4,
                          num_key_value_heads=2, intermediate_size=128)
    r = SimpleNamespace(train=SimpleNamespace(batch_size=2, grad_accum=1))
    steps = [{"step": i, "tokens": 2 * 32, "seconds": s, "loss": 1.0} for i, s in enumerate([9.0, 0.5, 0.5], 1)]
    out = {"steps": steps, "device": {"type": "cuda", "name": "NVIDIA H100 80GB HBM3"}}
    rec = bench_train.StepRecorder(out, {"warmup": 1}, r, save=lambda: None, t_start=0.0)
    rec.config, rec.n_lora, rec.bf16 = cfg, 1000, True
    m = rec.metrics()
    fpt = bench_train.flops_per_token(cfg, 1000, 32)["flops_per_token"]
    assert m["tokens_per_second"] == 128.0
    assert m["mfu_peak_tflops"] == pytest.approx(989.4)
    assert m["mfu"] == pytest.approx(128.0 * fpt / 989.4e12)
    rec.bf16 = False  # an fp16 run: the bf16 peak is not its peak
    assert rec.metrics()["mfu"] is None


# --- mixed precision on CUDA (fastft.trainer, bench.overhead) -----------------------------------------

@pytest.fixture
def sft_config(monkeypatch):
    """trl.SFTConfig as the keyword arguments it was given: TrainingArguments itself checks for a real
    bf16-capable GPU, which the stubs are not."""
    import trl

    monkeypatch.setattr(trl, "SFTConfig", lambda **kw: kw)


@pytest.mark.parametrize("device, dtype, bf16, fp16", [("cuda:0", "bfloat16", True, False),
                                                       ("cuda:0", "float16", False, True),
                                                       ("cpu", "float32", False, False)])
def test_trainer_mixed_precision_follows_the_device_and_dtype(sft_config, tmp_path, device, dtype, bf16, fp16):
    r = recipe.from_dict(tiny_recipe_dict(tmp_path))
    info = SimpleNamespace(device=device, dtype=dtype)
    from fastft import trainer
    from fastft.world import World

    kw = trainer.sft_config(r, tmp_path, info, "adamw_8bit", False, World(), (2, 4))
    assert (kw["bf16"], kw["fp16"], kw["use_cpu"]) == (bf16, fp16, device == "cpu")
    assert kw["optim"] == "adamw_8bit" and kw["gradient_accumulation_steps"] == 4


@pytest.mark.parametrize("cuda_bf16, want", [(True, torch.bfloat16), (False, torch.float16), (None, torch.float32)])
def test_overhead_plain_side_trains_in_the_gpus_dtype(sft_config, monkeypatch, tmp_path, cuda_bf16, want):
    # None: no GPU. Both sides of the comparison must run in the same precision as fastft picks
    from bench import overhead

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda_bf16 is not None)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bool(cuda_bf16))
    spec = {"work_dir": str(tmp_path), "batch_size": 4, "steps": 2, "seed": 3407, "max_length": 256}
    dtype = overhead._dtype(spec)
    assert dtype is want
    kw = overhead._sft_config(spec, dtype)
    assert (kw["bf16"], kw["fp16"], kw["use_cpu"]) == (want is torch.bfloat16, want is torch.float16,
                                                       cuda_bf16 is None)
    if cuda_bf16 is not None:
        assert backends.resolve_dtype("auto", "cuda:0") is want  # fastft's side: the same choice

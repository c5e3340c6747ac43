"""Runs that survive faults: kill -9 / SIGTERM and resume, crashed checkpoint writes, NaN steps,
out-of-memory, bad paths, a full disk, and data-parallel runs under torchrun (gloo, 2 processes)."""
import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from support import tiny_recipe_dict
from fastft import checkpoints, recipe, train

pytestmark = pytest.mark.slow

STEPS = 60


def _recipe_file(tmp_path, name="run", **sections):
    cfg = tiny_recipe_dict(tmp_path / name, backend="hf", **sections)
    cfg["train"].update({"max_steps": STEPS, "save_every": 10, "logging_every": 1,
                         **sections.get("train", {})})
    cfg["data"].update({"max_examples": 240})
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, tmp_path / name


def _fastft(*args, env=None, **kw):
    return subprocess.Popen([sys.executable, "-m", "fastft", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})}, **kw)


def _finish(proc, timeout=600):
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def _losses(out_dir):
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def _adapter(out_dir):
    from safetensors.torch import load_file

    return load_file(str(out_dir / "adapter" / "adapter_model.safetensors"))


def _poison_loss(monkeypatch, steps):
    """Make the training loss NaN on these optimizer steps (1-based), as a diverging run would."""
    from fastft.trainer import FastftTrainer

    real = FastftTrainer.compute_loss
    real = getattr(real, "__wrapped__", real)  # poisoned again in one test: replace, do not stack

    def compute_loss(self, model, inputs, *args, **kwargs):
        out = real(self, model, inputs, *args, **kwargs)
        if self.model.training and self.state.global_step + 1 in steps:
            return (out[0] * float("nan"), *out[1:]) if isinstance(out, tuple) else out * float("nan")
        return out

    compute_loss.__wrapped__ = real

    monkeypatch.setattr(FastftTrainer, "compute_loss", compute_loss)


def _out_of_memory_at(monkeypatch, step):
    """Raise torch's CUDA out-of-memory error when optimizer step ``step`` (1-based) starts."""
    import torch

    from fastft.trainer import FastftTrainer

    real = FastftTrainer.training_step

    def training_step(self, model, inputs, *args, **kwargs):
        if self.state.global_step + 1 == step:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected by the test)")
        return real(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(FastftTrainer, "training_step", training_step)


def _wait_for_checkpoint(out_dir, proc, timeout=300):
    marker = out_dir / "checkpoints" / "checkpoint-10" / checkpoints.MARKER
    t0 = time.time()
    while not marker.is_file():
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.time() - t0 < timeout, "no checkpoint appeared"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run of the recipe the fault tests interrupt."""
    tmp = tmp_path_factory.mktemp("ref")
    path, out = _recipe_file(tmp)
    rc, log = _finish(_fastft("train", path))
    assert rc == 0, log[-3000:]
    return _losses(out), _adapter(out)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "sigterm"])
def test_interrupted_run_resumes_to_the_same_result(tmp_path, reference, sig):
    path, out = _recipe_file(tmp_path)
    proc = _fastft("train", path)
    _wait_for_checkpoint(out, proc)
    proc.send_signal(sig)
    rc, log = _finish(proc)
    if sig == signal.SIGTERM:
        assert rc == 143, log[-3000:]
        assert "SIGTERM received: writing a checkpoint" in log and "Resume with: fastft train" in log
        assert not (out / "fastft.json").exists()
    else:
        assert rc == -9
    assert checkpoints.inspect(out).kind == "unfinished"
    # the same command, without --resume, notices the unfinished run and continues it
    rc, log = _finish(_fastft("train", path))
    assert rc == 0, log[-3000:]
    assert "resuming the unfinished run" in log
    ref_losses, ref_adapter = reference
    assert _losses(out) == ref_losses  # exact on CPU: same data order, RNG, optimizer and schedule
    got = _adapter(out)
    assert got.keys() == ref_adapter.keys()
    for k in got:
        assert (got[k] == ref_adapter[k]).all(), k
    info = json.loads((out / "fastft.json").read_text())
    assert info["metrics"]["resumed_from"].endswith("checkpoint-" + info["metrics"]["resumed_from"].split("-")[-1])
    assert info["metrics"]["train"]["train_tokens"] > 0


def test_incomplete_checkpoint_is_ignored_and_cleaned(tmp_path):
    path, out = _recipe_file(tmp_path, train={"max_steps": 20})
    r = recipe.load(path)
    train.run(r, log=lambda m: None)
    (out / "fastft.json").unlink()  # pretend the run died after its last checkpoint
    # a crash in the middle of writing checkpoint-30: files present, completion marker absent
    broken = out / "checkpoints" / "checkpoint-30"
    broken.mkdir()
    (broken / "adapter_model.safetensors").write_bytes(b"partial")
    staged = out / "checkpoints" / ".staging" / "checkpoint-40"
    staged.mkdir(parents=True)
    state = checkpoints.inspect(out)
    assert state.kind == "unfinished" and state.latest.name == "checkpoint-20"
    assert {p.name for p in state.incomplete} == {"checkpoint-30", "checkpoint-40"}
    logs = []
    r2 = recipe.load(path, ["train.max_steps=30"])
    with pytest.raises(train.TrainError, match=r"different recipe \(train.max_steps: 20 -> 30\)"):
        train.run(r2, log=logs.append)
    result = train.run(r, log=logs.append)
    assert any("ignoring incomplete checkpoint" in m and "checkpoint-30" in m for m in logs)
    assert result.info["metrics"]["resumed_from"].endswith("checkpoint-20")


def test_finished_run_is_not_overwritten_without_flag(tmp_path):
    path, out = _recipe_file(tmp_path, train={"max_steps": 3, "save_every": None})
    r = recipe.load(path)
    train.run(r, log=lambda m: None)
    with pytest.raises(train.TrainError, match="holds a finished run .* pass --overwrite"):
        train.run(r, log=lambda m: None)
    with pytest.raises(train.TrainError, match="--resume: nothing to resume"):
        train.run(recipe.load(path, ["output.dir=" + str(tmp_path / "empty")]), log=lambda m: None, resume=True)
    before = (out / "fastft.json").stat().st_mtime_ns
    train.run(r, log=lambda m: None, overwrite=True)
    assert (out / "fastft.json").stat().st_mtime_ns != before


def test_nan_steps_are_skipped_then_the_run_stops(tmp_path, monkeypatch):
    import torch

    path, out = _recipe_file(tmp_path, train={"max_steps": 12, "save_every": None, "max_nonfinite_steps": 2})
    _poison_loss(monkeypatch, {4, 7})
    logs = []
    result = train.run(recipe.load(path), log=logs.append)
    assert result.info["metrics"]["nonfinite_steps_skipped"] == [4, 7]
    assert any("step 4: non-finite loss or gradient, optimizer step skipped (1 of at most 2)" in m for m in logs)
    assert all(torch.isfinite(t).all() for t in _adapter(out).values())

    _poison_loss(monkeypatch, {3, 5, 6})
    path2, out2 = _recipe_file(tmp_path, "run2", train={"max_steps": 12, "save_every": None,
                                                        "max_nonfinite_steps": 2})
    with pytest.raises(train.TrainError, match=r"stopped at step 6: the loss or gradients were NaN/Inf on 3 steps"
                                               r".*train.max_nonfinite_steps=2.*learning rate"):
        train.run(recipe.load(path2), log=lambda m: None)
    assert not (out2 / "adapter").exists() and not (out2 / "fastft.json").exists()


def test_out_of_memory_names_the_fixes_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    path, out = _recipe_file(tmp_path, train={"max_steps": 20, "save_every": 5, "optim": "adamw_torch"})
    _out_of_memory_at(monkeypatch, 8)
    with pytest.raises(train.TrainError) as e:
        train.run(recipe.load(path), log=lambda m: None)
    msg = str(e.value)
    assert msg.startswith("out of GPU memory")
    assert "train.batch_size 8 -> 4 with train.grad_accum 1 -> 2" in msg and "train.optim: adamw_8bit" in msg
    assert "The last checkpoint (checkpoint-5) is intact" in msg
    assert (out / "checkpoints" / "checkpoint-5" / checkpoints.MARKER).is_file()


def test_a_failed_evaluation_keeps_the_adapter_and_exits_non_zero(tmp_path, monkeypatch):
    """The adapter and fastft.json are written before the after-training evaluation; when it
    fails, the run ends with an error that names the adapter and the command that evaluates it."""
    from fastft import cli, evaluate

    path, out = _recipe_file(tmp_path, train={"max_steps": 2, "save_every": None})

    def broken(*args, **kwargs):
        raise RuntimeError("size of tensor a (10) must match the size of tensor b (220)")

    monkeypatch.setattr(evaluate, "after_training", broken)
    lines = []
    assert cli.main(["train", str(path)]) == 1
    with pytest.raises(train.TrainError) as e:
        train.run(recipe.load(path, ["output.dir=" + str(out)]), log=lines.append, overwrite=True)
    msg = str(e.value)
    assert msg.startswith("the evaluation after training failed (RuntimeError: size of tensor a (10)")
    assert f"The trained adapter is saved in {out / 'adapter'}" in msg and f"fastft eval {out}" in msg
    assert any(msg in line for line in lines)
    assert set(_adapter(out)) and (out / "adapter" / "adapter_config.json").is_file()
    info = json.loads((out / "fastft.json").read_text())
    assert info["eval_error"].startswith("RuntimeError: size of tensor a") and "eval" not in info
    assert info["metrics"]["steps"] == 2


def test_bad_output_paths_and_full_disk(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    path, _ = _recipe_file(tmp_path, train={"max_steps": 2, "save_every": None})
    with pytest.raises(train.TrainError, match="output.dir .*a-file/out: cannot write there"):
        train.run(recipe.load(path, [f"output.dir={blocker}/out"]), log=lambda m: None)

    from fastft import rundir

    real = rundir.atomic_write_text

    def full(p, text):
        if p.name == "fastft.json":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(p, text)

    monkeypatch.setattr(rundir, "atomic_write_text", full)
    path, out = _recipe_file(tmp_path, "full", train={"max_steps": 2, "save_every": None})
    with pytest.raises(train.TrainError, match="No space left on device \\(the disk is full"):
        train.run(recipe.load(path), log=lambda m: None)
    assert not (out / "fastft.json").exists()
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_skip_bad_rows_counts_and_continues(tmp_path):
    rows = [{"instruction": "classify red , blue", "output": "color"}] * 30
    lines = [json.dumps(r) for r in rows] + ['{"instruction": "broken', '{"instruction": "x"}',
                                             json.dumps({"messages": 1})]
    src = tmp_path / "d.jsonl"
    src.write_text("\n".join(lines) + "\n")
    cfg = tiny_recipe_dict(tmp_path / "o", backend="hf", data={"train": str(src), "max_examples": None,
                                                                "eval_fraction": 0.0},
                           train={"max_steps": 2})
    from fastft.data import DataError

    with pytest.raises(DataError, match=r"d.jsonl:31: malformed JSON"):
        train.run(recipe.from_dict(cfg), log=lambda m: None)
    cfg["data"]["skip_bad_rows"] = True
    logs = []
    result = train.run(recipe.from_dict(cfg, ["output.dir=" + str(tmp_path / "o2")]), log=logs.append)
    assert result.info["data"]["skipped_rows"] == 3
    assert any("skipped 3 bad rows (data.skip_bad_rows: true); first: " in m and "d.jsonl:31" in m for m in logs)


def test_torchrun_two_processes_matches_one(tmp_path, reference):
    # global batch 8 = 2 processes x 4; the same 60 steps as the single-process reference
    path, out = _recipe_file(tmp_path, train={"save_every": None})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           "-m", "fastft", "train", str(path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    log = proc.stdout + proc.stderr
    assert "data-parallel over 2 processes: per-device batch 4 x grad accum 1 x 2 = global batch 8" in log
    assert log.count("run summary") == 1  # rank 0 alone reports and writes
    info = json.loads((out / "fastft.json").read_text())
    assert info["metrics"]["world_size"] == 2
    got = dict(_losses(out))
    ref = dict(reference[0])
    assert got.keys() == ref.keys()
    worst = max(abs(got[s] - ref[s]) / max(abs(ref[s]), 1e-3) for s in ref)
    assert worst < 0.02, f"loss curves differ by up to {worst:.3%}"


def test_nonfinite_check_is_one_device_side_reduction():
    import torch

    from fastft.callbacks import NonFiniteGuard

    grads = [torch.ones(3), torch.tensor([1e38, -3e38]), torch.ones(2, dtype=torch.bfloat16)]
    assert NonFiniteGuard.all_finite(grads)  # huge but finite: the largest |g| does not overflow as a norm would
    for bad in (float("nan"), float("inf"), float("-inf")):
        assert not NonFiniteGuard.all_finite(grads + [torch.tensor([0.0, bad], dtype=torch.bfloat16)])

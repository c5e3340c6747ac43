"""The adapter registry: versions, stages, diff, integrity, and two processes pushing at once.

Runs here are fabricated (fastft.json + adapter files): the registry stores files and metadata and
never loads a model; tests/test_merge.py pushes a real trained run and merges it from a reference."""
import json
import os
import subprocess
import sys
import time

import pytest

from fastft import registry, registry_meta
from fastft.registry import DamagedEntryError, Registry, RegistryError


def fake_run(path, lr=3e-3, loss=0.5, status=None, r=8, payload=b"weights-v1"):
    (path / "adapter").mkdir(parents=True, exist_ok=True)
    (path / "adapter" / "adapter_config.json").write_text(json.dumps({"r": r, "lora_alpha": 16, "peft_type": "LORA"}))
    (path / "adapter" / "adapter_model.safetensors").write_bytes(payload)
    (path / "adapter" / "tokenizer.json").write_text('{"shared": "by every version"}')
    info = {"schema_version": 1,
            "recipe": {"model": {"name": "fastft-tiny", "load_in_4bit": True},
                       "lora": {"r": r, "alpha": 16, "use_dora": False},
                       "train": {"lr": lr, "max_steps": 40}, "output": {"dir": str(path)}},
            "backend": {"name": "hf", "dtype": "float32", "model_path": "/nowhere"},
            "versions": {"fastft": "0.1.0", "torch": "2.13.0"},
            "data": {"hash": "sha256:abc"},
            "metrics": {"before": {"eval_loss": 13.0}, "after": {"eval_loss": loss}, "steps": 40, "losses": [1, 2]},
            "base_model": {"model_id": "fastft-tiny", "weights_sha256": "sha256:w", "tokenizer_sha256": "sha256:t",
                           "architecture": {"class": "LlamaForCausalLM"}}}
    if status:
        info["status"] = status
        info["gates"] = {"task.exact_match": {"rule": ">= 0.8", "value": 0.1, "passed": False}}
    (path / "fastft.json").write_text(json.dumps(info))
    return path


def test_push_list_show_diff(tmp_path):
    reg = Registry(tmp_path / "reg")
    a = reg.push(fake_run(tmp_path / "a", lr=3e-3, loss=0.5), "bot")
    b = reg.push(fake_run(tmp_path / "b", lr=1e-3, loss=0.4, payload=b"weights-v2"), "bot")
    assert (a.ref, b.ref) == ("bot@v1", "bot@v2")
    assert b.meta["base_model"]["weights_sha256"] == "sha256:w" and b.meta["data_hash"] == "sha256:abc"
    assert b.meta["lora"]["r"] == 8 and b.meta["quantization"]["load_in_4bit"] is True
    assert b.meta["versions"]["torch"] == "2.13.0" and "pushed" in b.meta and "source" in b.meta
    # content addressing: the tokenizer file both versions share is stored once
    objects = [p for p in (tmp_path / "reg" / "objects").rglob("*") if p.is_file()]
    assert len(objects) == 4 + 1 + 1  # v1: 4 files; v2: new weights + new fastft.json
    listing = registry_meta.format_list(reg)
    assert "bot@v1" in listing and "bot@v2" in listing and "0.4000" in listing
    shown = registry_meta.format_show(reg, reg.get("bot"))  # NAME = the newest
    assert shown.startswith("bot@v2") and "all match their sha256" in shown and "sha256:w" in shown
    d = registry_meta.diff(reg.get("bot@v1"), reg.get("bot@v2"))
    assert d["hyperparameters"] == {"train.lr": (3e-3, 1e-3)}  # output.dir differs too, and is left out
    assert d["metrics"] == {"after.eval_loss": (0.5, 0.4)}
    assert "train.lr" in registry_meta.format_diff(reg.get("bot@v1"), reg.get("bot@v2"), d)
    with pytest.raises(RegistryError, match="bot@v3 does not exist"):
        reg.get("bot@v3")
    with pytest.raises(RegistryError, match="no adapter named 'nope'.*it has: bot"):
        reg.get("nope")
    with pytest.raises(RegistryError, match="--name"):
        reg.push(tmp_path / "a", "bad@name")


def test_promote_rollback_and_rejected_runs(tmp_path):
    reg = Registry(tmp_path / "reg")
    for i in range(3):
        reg.push(fake_run(tmp_path / f"r{i}", lr=10.0 ** -(i + 2)), "bot")
    reg.push(fake_run(tmp_path / "bad", status="rejected"), "bot")
    with pytest.raises(RegistryError, match="no production version yet"):
        reg.get("bot@production")
    for v in (1, 2, 3):
        reg.promote(f"bot@v{v}", "production")
    reg.promote("bot@v1", "staging")
    assert reg.stages("bot") == {"staging": 1, "production": 3}
    assert reg.rollback("bot") == (3, 2)
    assert reg.get("bot@production").version == 2
    assert reg.rollback("bot") == (2, 1)
    with pytest.raises(RegistryError, match="no earlier production version.*v1 is the only one"):
        reg.rollback("bot")
    assert reg.stages("bot") == {"staging": 1, "production": 1}
    # a run its eval gates rejected needs --force
    with pytest.raises(RegistryError, match="bot@v4 was rejected.*task.exact_match.*--force"):
        reg.promote("bot@v4", "production")
    reg.promote("bot@v4", "production", force=True)
    assert reg.get("bot@production").version == 4 and reg.get("bot@v4").status == "rejected"
    assert reg.rollback("bot") == (4, 1)


def test_cli_registry_commands(tmp_path, capsys):
    from fastft import cli

    fake_run(tmp_path / "a")
    fake_run(tmp_path / "b", lr=1e-4, loss=0.3)
    r = ["--registry", str(tmp_path / "reg")]
    assert cli.main(["registry", "push", str(tmp_path / "a"), "--name", "bot"] + r) == 0
    assert cli.main(["registry", "push", str(tmp_path / "b"), "--name", "bot"] + r) == 0
    assert "as bot@v2" in capsys.readouterr().out
    assert cli.main(["registry", "list"] + r) == 0
    assert "bot@v2" in capsys.readouterr().out
    assert cli.main(["registry", "diff", "bot@v1", "bot@v2", "--json"] + r) == 0
    assert json.loads(capsys.readouterr().out)["hyperparameters"]["train.lr"] == [3e-3, 1e-4]
    assert cli.main(["registry", "promote", "bot@v1", "--stage", "production"] + r) == 0
    assert cli.main(["registry", "promote", "bot@v2", "--stage", "production"] + r) == 0
    assert cli.main(["registry", "rollback", "bot"] + r) == 0
    assert "rolled back from v2 to v1" in capsys.readouterr().out
    assert cli.main(["registry", "show", "bot@production", "--json"] + r) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["ref"] == "bot@v1" and shown["stages"] == ["production"] and shown["damaged"] == []
    assert cli.main(["registry", "show", "bot@v9"] + r) == 2
    assert "bot@v9 does not exist" in capsys.readouterr().err


def test_resolve_ref_checks_out_verified_files(tmp_path):
    reg_dir = tmp_path / "reg"
    run = fake_run(tmp_path / "a")
    Registry(reg_dir).push(run, "bot")
    Registry(reg_dir).promote("bot@v1", "staging")
    assert registry.resolve_ref(run) == run  # a run directory is itself
    for ref in ("bot", "bot@v1", "bot@latest", "bot@staging"):
        got = registry.resolve_ref(ref, reg_dir)
        assert (got / "adapter" / "adapter_model.safetensors").read_bytes() == b"weights-v1"
        assert json.loads((got / "fastft.json").read_text()) == json.loads((run / "fastft.json").read_text())
    with pytest.raises(RegistryError, match="no such run directory, and no adapter named 'other'"):
        registry.resolve_ref("other@v1", reg_dir)
    with pytest.raises(RegistryError, match="not a registry reference"):
        registry.resolve_ref(str(tmp_path / "missing" / "run"), reg_dir)
    (tmp_path / "empty").mkdir()
    with pytest.raises(RegistryError, match="no fastft.json"):
        registry.resolve_ref(tmp_path / "empty", reg_dir)


def test_tampered_files_are_reported_never_loaded(tmp_path):
    reg = Registry(tmp_path / "reg")
    reg.push(fake_run(tmp_path / "a"), "bot")
    out = reg.checkout("bot@v1")
    # a modified checkout is replaced from the verified store
    (out / "adapter" / "adapter_model.safetensors").write_bytes(b"evil")
    out = registry.resolve_ref("bot@v1", tmp_path / "reg")
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == b"weights-v1"
    # a modified stored object makes the entry damaged: reported by show, refused by resolve/promote
    digest = reg.get("bot@v1").manifest["adapter/adapter_model.safetensors"]
    obj = tmp_path / "reg" / "objects" / digest[:2] / digest
    os.chmod(obj, 0o644)
    obj.write_bytes(b"weights-v2")  # same size, other content
    with pytest.raises(DamagedEntryError, match=r"bot@v1 .* is damaged and will not be loaded: "
                                                r"adapter/adapter_model.safetensors"):
        registry.resolve_ref("bot@v1", tmp_path / "reg")
    assert "DAMAGED" in registry_meta.format_show(reg, reg.get("bot@v1"))
    with pytest.raises(DamagedEntryError):
        reg.promote("bot@v1", "production")
    obj.unlink()
    assert "is missing" in reg.verify(reg.get("bot@v1"))[0]


def test_a_push_that_fails_midway_records_nothing(tmp_path, monkeypatch):
    reg = Registry(tmp_path / "reg")
    run = fake_run(tmp_path / "a")
    real, calls = Registry._store_object, []

    def flaky(self, src):
        calls.append(src)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real(self, src)

    monkeypatch.setattr(Registry, "_store_object", flaky)
    with pytest.raises(OSError):
        reg.push(run, "bot")
    assert reg.versions("bot") == []
    assert not list((tmp_path / "reg" / "objects").rglob(".incoming.*"))
    monkeypatch.setattr(Registry, "_store_object", real)
    assert reg.push(run, "bot").version == 1


PUSHER = """
import sys, time
from pathlib import Path
from fastft.registry import Registry
reg, run, go, n = Registry(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
while not go.exists():
    time.sleep(0.005)
print(" ".join(str(Registry(sys.argv[1]).push(run, "bot").version) for _ in range(n)))
"""


def test_two_processes_pushing_at_once_get_distinct_versions(tmp_path):
    reg_dir, go, n = tmp_path / "reg", tmp_path / "go", 8
    runs = [fake_run(tmp_path / f"run{i}", lr=10.0 ** -(i + 2), payload=f"weights-{i}".encode()) for i in range(2)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    procs = [subprocess.Popen([sys.executable, "-c", PUSHER, str(reg_dir), str(run), str(go), str(n)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for run in runs]
    time.sleep(0.5)  # both started and waiting
    go.touch()
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    got = [[int(v) for v in o[0].split()] for o in outs]
    assert sorted(got[0] + got[1]) == list(range(1, 2 * n + 1)), got  # distinct, none lost
    reg = Registry(reg_dir)
    entries = reg.versions("bot")
    assert len(entries) == 2 * n
    for i, run in enumerate(runs):  # each version holds the files of the process that pushed it
        for v in got[i]:
            e = reg.get(f"bot@v{v}")
            assert e.source == str(run.resolve()) and reg.verify(e) == []
            assert e.meta["recipe"]["train"]["lr"] == 10.0 ** -(i + 2)

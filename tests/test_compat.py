"""Compatibility of an adapter with a base: the recorded fingerprint against the base being loaded.

The second base is the tiny model's architecture with weights from another seed (and, for the other
cases, another width or an edited tokenizer), written into a tmp folder. The refusal through a
command (fastft merge with a real trained adapter) is in tests/test_merge.py."""
import json
import os
import shutil

import pytest

from fastft import files
from fastft.models import provenance
from fastft.models.provenance import IncompatibleBaseError


def write_base(tiny_path, dst, seed=1, **config):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    cfg = AutoConfig.from_pretrained(tiny_path)
    for k, v in config.items():
        setattr(cfg, k, v)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(dst, safe_serialization=True)
    AutoTokenizer.from_pretrained(tiny_path).save_pretrained(dst)
    return str(dst)


@pytest.fixture(scope="module")
def recorded(tiny_path):
    return {"base_model": provenance.base_fingerprint(tiny_path, model_id="fastft-tiny")}


def test_fingerprint_of_the_tiny_model(tiny_path, recorded):
    fp = recorded["base_model"]
    assert fp["model_id"] == "fastft-tiny" and fp["quantized_checkpoint"] is False
    assert fp["architecture"]["class"] == "LlamaForCausalLM" and fp["architecture"]["hidden_size"] == 256
    assert fp["weights_sha256"].startswith("sha256:") and fp["tokenizer_sha256"].startswith("sha256:")
    assert provenance.check_compatible(recorded, tiny_path) == []


def test_another_seed_is_refused_and_force_overrides(tiny_path, recorded, tmp_path):
    other = write_base(tiny_path, tmp_path / "seed1", seed=1)
    with pytest.raises(IncompatibleBaseError) as e:
        provenance.check_compatible(recorded, other)
    msg = str(e.value)
    assert "trained on 'fastft-tiny'" in msg and "weights differ" in msg and "--force" in msg
    assert "tokenizer" not in msg and "architecture" not in msg  # only what differs is named
    notes = provenance.check_compatible(recorded, other, force=True)
    assert notes[0].startswith("--force: ") and "weights differ" in notes[0]


def test_architecture_and_tokenizer_differences_are_named(tiny_path, recorded, tmp_path):
    wide = write_base(tiny_path, tmp_path / "wide", intermediate_size=512)
    with pytest.raises(IncompatibleBaseError, match="architecture differs .*intermediate_size: trained 768, now 512"):
        provenance.check_compatible(recorded, wide)
    same_weights = tmp_path / "tok"
    shutil.copytree(tiny_path, same_weights)
    tok = json.loads((same_weights / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = list(vocab)[10:12]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # two token ids swapped: same sizes, other text
    (same_weights / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(IncompatibleBaseError) as e:
        provenance.check_compatible(recorded, str(same_weights))
    assert "tokenizer differ" in str(e.value) and "weights differ" not in str(e.value)


def test_a_different_quantization_is_a_note(tiny_path, recorded):
    rec = {"base_model": {**recorded["base_model"], "load_in_4bit": True}}
    assert provenance.check_compatible(rec, tiny_path, load_in_4bit=True) == []
    (note,) = provenance.check_compatible(rec, tiny_path, load_in_4bit=False)
    assert "trained on a 4-bit NF4 base and is loaded onto a 16-bit one" in note


def test_runs_without_a_fingerprint_are_loaded_with_a_note(tiny_path):
    assert "compatibility not checked" in provenance.check_compatible({"recipe": {}}, tiny_path)[0]


def test_weight_hashes_are_cached_by_path_size_and_mtime(tmp_path):
    f = tmp_path / "w.safetensors"
    f.write_bytes(b"a" * 100)
    cache = {}
    h1 = files.file_sha256(f, cache)
    st = f.stat()
    f.write_bytes(b"b" * 100)  # same size; restore the mtime: the cached hash is reused (not re-read)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert files.file_sha256(f, cache) == h1
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # touched: hashed again
    assert files.file_sha256(f, cache) != h1


def test_base_path_for_prefers_the_given_then_the_recorded_path(tiny_path, tmp_path):
    info = {"recipe": {"model": {"name": "fastft-tiny", "load_in_4bit": True}},
            "base_model": {"path": str(tmp_path / "gone")}, "backend": {}}
    assert provenance.base_path_for(info) == tiny_path  # recorded path missing: model.name resolved again
    info["base_model"]["path"] = str(tmp_path)
    assert provenance.base_path_for(info) == str(tmp_path)
    assert provenance.base_path_for(info, base="fastft-tiny") == tiny_path

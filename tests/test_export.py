"""fastft export: GGUF files made by llama.cpp's converter, checked and verified against the merged model.

CI (no llama.cpp build): a short SmolLM2 QLoRA run exported to f16 and q8_0; the written files'
metadata hold the chat template and EOS, and transformers' GGUF loader reads them back with logits
within the f16 / q8_0 tolerances of the merged model. The tiny model's word-level tokenizer is one
llama.cpp's converter does not support: that is the "unrecognized pre-tokenizer" error case.

Marked ``gguf`` (llama-cpp-python installed; `make test-gguf`): the SmolLM2 demo recipe trained, then
exported to f16, q8_0 and q4_k_m and answered in llama.cpp itself.
"""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest

from support import ROOT, tiny_recipe_dict
from fastft import cli, export, recipe, train
from fastft.export import ExportError, checks, llamacpp, options
from fastft.files import file_sha256


# --- arguments, paths and errors that need no model -----------------------------------------------

def test_parse_quants():
    assert export.parse_quants(["q8_0,F16", "q4_k_m", "f16"]) == ["f16", "q8_0", "q4_k_m"]
    assert export.parse_quants(["Q4-K-M"]) == ["q4_k_m"]
    for bad in (["q4"], ["f16,int8"], [","]):
        with pytest.raises(ExportError) as e:
            export.parse_quants(bad)
        assert e.value.exit_code == 2
    with pytest.raises(ExportError, match=r"'q4': unknown type; choose from f16, bf16, q8_0, q2_k"):
        export.parse_quants(["q4"])


def test_output_paths(tmp_path):
    run = tmp_path / "my-run"
    assert export.output_paths(run, ["f16"], None) == {"f16": run / "export" / "my-run-f16.gguf"}
    assert export.output_paths(run, ["f16", "q8_0"], str(tmp_path / "m-{quant}.gguf")) == {
        "f16": tmp_path / "m-f16.gguf", "q8_0": tmp_path / "m-q8_0.gguf"}
    assert export.output_paths(run, ["f16", "q8_0"], str(tmp_path) + "/")["q8_0"] == tmp_path / "my-run-q8_0.gguf"
    assert export.output_paths(run, ["q8_0"], str(tmp_path / "x.gguf")) == {"q8_0": tmp_path / "x.gguf"}
    with pytest.raises(ExportError, match=r"2 types need a folder .* or a name with \{quant\}"):
        export.output_paths(run, ["f16", "q8_0"], str(tmp_path / "x.gguf"))
    with pytest.raises(ExportError, match=r"name the file \*\.gguf"):
        export.output_paths(run, ["f16"], str(tmp_path / "x.bin"))


def test_unwritable_or_existing_output(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(ExportError, match=r"cannot write the f16 export to .*a-file/out\.gguf.*choose a writable --out") as e:
        options.check_writable({"f16": blocker / "out.gguf"}, overwrite=False)
    assert e.value.exit_code == 2
    existing = tmp_path / "old.gguf"
    existing.write_bytes(b"GGUF")
    with pytest.raises(ExportError, match=r"old\.gguf exists; pass --overwrite"):
        options.check_writable({"q8_0": existing}, overwrite=False)
    options.check_writable({"q8_0": existing}, overwrite=True)
    assert existing.read_bytes() == b"GGUF" and sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "old.gguf"]


def test_k_quants_without_llama_cpp_say_how_to_install(monkeypatch):
    monkeypatch.setattr(options, "llama_cpp", lambda: None)
    options.need_llama_cpp(["f16", "bf16", "q8_0"])  # the converter alone makes these
    with pytest.raises(ExportError) as e:
        options.need_llama_cpp(["f16", "q4_k_m"])
    assert e.value.exit_code == 2
    assert "q4_k_m" in str(e.value) and "pip install 'fastft[gguf]'" in str(e.value) and "make gguf" in str(e.value)


def test_engine_choice_records_its_reason(monkeypatch):
    """The transformers engine's record says why llama.cpp did not verify: asked for, or not importable."""
    assert options.choose_engine("transformers") == (False, "--engine transformers")
    with pytest.raises(ExportError, match=r"--engine 'vllm': choose auto, llama.cpp or transformers") as e:
        options.choose_engine("vllm")
    assert e.value.exit_code == 2
    find_spec = options.importlib.util.find_spec
    installed = {"llama_cpp": None}
    monkeypatch.setattr(options.importlib.util, "find_spec",
                        lambda name, *a: installed[name] if name in installed else find_spec(name, *a))
    monkeypatch.setattr(options, "llama_cpp", lambda: None)
    assert options.choose_engine("auto") == (False, "llama-cpp-python not installed")
    with pytest.raises(ExportError, match=r"--engine llama\.cpp: llama-cpp-python is not installed") as e:
        options.choose_engine("llama.cpp")
    assert e.value.exit_code == 2
    installed["llama_cpp"] = object()  # found, but its import fails (a broken build)
    assert options.choose_engine("auto") == (False, "llama-cpp-python installed but its import fails")
    monkeypatch.setattr(options, "llama_cpp", lambda: object())
    assert options.choose_engine("auto") == (True, "llama-cpp-python installed")
    assert options.choose_engine("transformers") == (False, "--engine transformers")


def test_merge_dtype_follows_the_planners_parameter_count():
    """fastft.json records part of the base's config (provenance.ARCH_KEYS); the planner counts its
    parameters exactly from that: fp32 merge for the tiny model, bf16 for Llama-3-8B."""
    from fastft.models import provenance, shapes

    for name, n in (("fastft-tiny", None), ("unsloth/llama-3-8b-bnb-4bit", 8_030_261_248)):
        cfg, _ = shapes.find_config(name)
        arch = {"class": cfg["architectures"][0], **{k: cfg[k] for k in provenance.ARCH_KEYS if k in cfg}}
        assert export._parameters(arch) == shapes.shapes(cfg).total_params == (n or shapes.shapes(cfg).total_params)
    assert export._parameters(arch) > export.FP32_MERGE_MAX_PARAMS
    assert export._parameters(None) is None and export._parameters({"class": "LlamaForCausalLM"}) is None


def test_bench_results_name_the_cpu_model_and_cores():
    import os

    import torch

    from bench import common

    if torch.cuda.is_available():
        pytest.skip("the CPU's name is what a CPU run records")
    dev = common.device()
    assert dev["type"] == "cpu" and dev["cores"] == os.cpu_count() and dev["name"] and dev["name"] != "x86_64"


def test_converter_errors_name_the_cause(tmp_path):
    conv = {"version": "0.3.36"}
    log = tmp_path / "convert.log"
    pre = ("WARNING:hf-to-gguf:** chkhsh:  " + "ab" * 32 + "\nNotImplementedError: BPE pre-tokenizer was not "
           "recognized - update get_vocab_base_pre()\n")
    e = llamacpp.converter_error(pre, 1, log, conv, tmp_path)
    assert e.exit_code == 2 and "does not recognize this model's tokenizer" in str(e) and "abababab" in str(e)
    assert llamacpp.LLAMA_CPP_DIR_ENV in str(e) and str(log) in str(e)
    e = llamacpp.converter_error("ERROR:hf-to-gguf:Model FooForCausalLM is not supported\n", 1, log, conv, tmp_path)
    assert "does not support the architecture FooForCausalLM" in str(e) and e.exit_code == 2
    e = llamacpp.converter_error("ModuleNotFoundError: No module named 'sentencepiece'\n", 1, log, conv, tmp_path)
    assert "pip install sentencepiece" in str(e)
    e = llamacpp.converter_error("Traceback ...\nValueError: something odd\n", 1, log, conv, tmp_path)
    assert e.exit_code == 1 and "failed (exit 1)" in str(e) and "ValueError: something odd" in str(e)


class _Tok:
    eos_token, eos_token_id, chat_template = "<|im_end|>", 2, "{{ messages }}"


def _meta(**kw):
    m = {"architecture": "llama", "chat_template": "{{ messages }}", "eos_token_id": 2, "eot_token_id": None,
         "eom_token_id": None, "tokens": ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "a", "<|eot_id|>", "b"]}
    return m | kw


def test_metadata_checks():
    assert checks.check_metadata(_meta(), _Tok(), [2]) == []
    assert checks.check_metadata(_meta(), _Tok(), [2, 4]) == []  # <|eot_id|>: llama.cpp stops on it by its text
    assert checks.check_metadata(_meta(eot_token_id=5), _Tok(), [2, 5]) == []  # b is the file's eot
    probs = checks.check_metadata(_meta(chat_template=None, eos_token_id=0), _Tok(), [2, 5])
    assert any("chat_template is missing" in p for p in probs)
    assert any("eos_token_id is 0, the model's eos is 2" in p for p in probs)
    assert any("stops at token 5 ('b') but llama.cpp would not end generation on it" in p for p in probs)
    assert checks.check_metadata(_meta(chat_template="other"), _Tok(), [2]) == [
        "tokenizer.chat_template is not the run's chat template"]
    bad_vocab = _meta(tokens=["x", "y", "z"])
    assert checks.check_metadata(bad_vocab, _Tok(), [2]) == [
        "token 2 is 'z' in the GGUF vocabulary, '<|im_end|>' in the model's"]


def test_run_without_adapter(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "fastft.json").write_text(json.dumps({"recipe": {}}))
    with pytest.raises(ExportError, match=r"no adapter \(adapter/adapter_config\.json missing\)") as e:
        export.export(run, ["f16"])
    assert e.value.exit_code == 2
    assert cli.main(["export", str(tmp_path / "nope"), "--gguf", "f16"]) == 2
    assert cli.main(["export", str(run), "--gguf", "q3"]) == 2


# --- the converter on real models ------------------------------------------------------------------

@pytest.mark.slow
def test_converter_is_unpacked_once(download_cache, fastft_cache):
    conv = llamacpp.converter()
    script = Path(conv["script"])
    assert script.name == "convert_hf_to_gguf.py" and (script.parent / "gguf-py" / "gguf" / "gguf_reader.py").is_file()
    assert (script.parent / "conversion" / "llama.py").is_file()
    assert conv["version"] == llamacpp.CONVERTER_VERSION and conv["sdist_sha256"] == llamacpp.CONVERTER_SDIST_SHA256
    assert llamacpp.converter() == conv  # cached
    assert not list(script.parent.parent.glob(script.parent.name + ".*/"))  # no temp folder left


@pytest.mark.slow
def test_tiny_model_tokenizer_is_refused_cleanly(tmp_path, download_cache, one_torch_thread):
    """The embedded tiny model has a word-level tokenizer, which llama.cpp has no pre-tokenizer for:
    a clear error, exit 2, and no GGUF (partial or complete) left behind."""
    r = recipe.from_dict(tiny_recipe_dict(tmp_path / "run", data={"max_examples": 32, "eval_fraction": 0.0},
                                          train={"max_steps": 1, "batch_size": 4}, eval={"after_training": False}))
    train.run(r, log=lambda m: None)
    with pytest.raises(ExportError) as e:
        export.export(tmp_path / "run", ["f16"], verify=False, log=lambda m: None)
    assert e.value.exit_code == 2
    assert "does not recognize this model's tokenizer" in str(e.value)
    log = Path(str(e.value).rsplit("Converter log: ", 1)[1].strip())
    assert log.is_file() and "BPE pre-tokenizer was not recognized" in log.read_text()
    left = [p.name for p in (tmp_path / "run").rglob("*") if p.suffix in (".gguf", ".partial") or
            p.name.startswith(".export.")]
    assert left == []


@pytest.fixture(scope="module")
def smollm2_run(download_cache, fastft_cache, tmp_path_factory):
    """Two QLoRA steps of the SmolLM2 demo recipe (no end-of-run eval): a real run to export."""
    out = tmp_path_factory.mktemp("smollm2-export") / "run"
    r = recipe.load(ROOT / "recipes" / "smollm2-demo.yaml",
                    overrides=["train.max_steps=2", f"output.dir={out}", "eval.after_training=false",
                               "data.mix=null", "data.max_examples=16"])
    train.run(r, log=lambda m: None)
    return out


@pytest.fixture(scope="module")
def smollm2_exports(smollm2_run):
    """``fastft export RUN --gguf f16,q8_0`` (transformers engine) once: (exit code, stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = cli.main(["export", str(smollm2_run), "--gguf", "f16,q8_0", "--engine", "transformers",
                       "--max-prompts", "6", "--max-new-tokens", "24"])
    return rc, err.getvalue()


@pytest.mark.slow
def test_smollm2_export_f16_and_q8_0(smollm2_run, smollm2_exports):
    from transformers import AutoTokenizer

    rc, err = smollm2_exports
    assert rc == 0, err
    assert "GGUF export of" in err and "transformers" in err and "pass" in err
    tok = AutoTokenizer.from_pretrained(smollm2_run / "adapter")
    doc = json.loads((smollm2_run / "export.json").read_text())
    info = json.loads((smollm2_run / "fastft.json").read_text())
    assert [e["quant"] for e in doc["exports"]] == ["f16", "q8_0"]
    assert doc["reference"]["prompts"] == 6 + len(export.GENERAL_PROMPTS) and doc["reference"]["held_out"] == 6
    recorded = {rec["file"]: rec for rec in info["exports"]}
    for e in doc["exports"]:
        rec = recorded[e["file"]]
        path = Path(e["file"])
        assert path.parent == smollm2_run / "export" and path.name == f"run-{e['quant']}.gguf"
        assert e["bytes"] == path.stat().st_size and e["sha256"] == file_sha256(path)
        assert rec["sha256"] == e["sha256"] and "per_prompt" not in rec.get("verification", {})
        assert e["converter"]["version"] == llamacpp.CONVERTER_VERSION
        # the file itself: read back independently of what export recorded
        meta = checks.read_metadata(path)
        assert meta["architecture"] == "llama" and meta["tokenizer_model"] == "gpt2"
        assert meta["tokenizer_pre"] == "smollm"  # llama.cpp splits text as SmolLM2 does
        assert meta["chat_template"] == tok.chat_template
        assert meta["eos_token_id"] == tok.eos_token_id == 2 and meta["tokens"][2] == "<|im_end|>"
        assert meta["file_type"] == {"f16": 1, "q8_0": 7}[e["quant"]]
        v = e["verification"]
        assert v["passed"] and v["gated"], v["checks"]
        assert v["engine"].startswith("transformers GGUF loader (--engine transformers: logits compared")
        rel, argmax = export.LOGIT_TOLERANCE[e["quant"]]
        assert v["relative_to_scale"] <= rel and v["argmax_agreement"] >= argmax
        print(e["quant"], f"{e['bytes'] / 1e6:.1f} MB", "rel diff", v["relative_to_scale"], "argmax",
              v["argmax_agreement"], e["seconds"])
    f16, q8 = doc["exports"]
    assert f16["verification"]["relative_to_scale"] < q8["verification"]["relative_to_scale"]
    assert 1.7 < f16["bytes"] / q8["bytes"] < 2.0  # 16 bits vs 8.5 bits per weight
    assert not list(smollm2_run.glob(".export.*")) and not list((smollm2_run / "export").glob(".*partial"))


@pytest.mark.slow
def test_failed_verification_keeps_the_file_marks_it_and_exits_3(smollm2_run, tmp_path, monkeypatch, capsys):
    """An f16 held to an impossible logit tolerance: the file is a correct GGUF, so it is kept, but the
    export is recorded as failed and the command exits 3."""
    monkeypatch.setitem(export.LOGIT_TOLERANCE, "f16", (0.0, 1.0))
    out = tmp_path / "strict.gguf"
    rc = cli.main(["export", str(smollm2_run), "--gguf", "f16", "--out", str(out), "--engine", "transformers",
                   "--max-prompts", "2", "--max-new-tokens", "8"])
    err = capsys.readouterr().err
    assert rc == export.VERIFY_EXIT_CODE == 3
    assert "FAIL f16: max |logit diff| / scale" in err and "does not answer like the merged model" in err
    assert out.is_file() and out.read_bytes()[:4] == b"GGUF"
    rec = [e for e in json.loads((smollm2_run / "fastft.json").read_text())["exports"] if e["file"] == str(out)]
    assert len(rec) == 1 and rec[0]["verification"]["passed"] is False


@pytest.mark.slow
def test_export_attached_to_a_registry_version(smollm2_run, smollm2_exports, tmp_path):
    from fastft import registry, registry_meta

    files = sorted((smollm2_run / "export").glob("*-q8_0.gguf"))
    assert len(files) == 1, smollm2_exports[1]
    reg = registry.Registry(tmp_path / "reg")
    entry = reg.push(smollm2_run, "smol")
    x = reg.attach(entry.ref, files[0])
    assert x["quant"] == "q8_0" and x["verification"]["passed"] is True
    assert Path(x["object"]).is_file() and x["sha256"] == file_sha256(files[0])
    listed = reg.exports(reg.get("smol@v1"))
    assert [e["file"] for e in listed] == [files[0].name] and listed[0]["intact"]
    assert "q8_0" in registry_meta.format_show(reg, reg.get("smol@v1")) and "verified: pass" in \
        registry_meta.format_show(reg, reg.get("smol@v1"))
    not_gguf = tmp_path / "x.gguf"
    not_gguf.write_text("hello")
    with pytest.raises(registry.RegistryError, match="not a GGUF file"):
        reg.attach("smol@v1", not_gguf)


# --- in llama.cpp itself (make test-gguf) ------------------------------------------------------------

@pytest.mark.gguf
@pytest.mark.slow
def test_smollm2_demo_in_llama_cpp(download_cache, fastft_cache, tmp_path):
    """The SmolLM2 demo, trained as `make demo` does (without the end-of-run eval), exported to f16,
    q8_0 and q4_k_m and answered by llama.cpp: f16 gives the merged model's answer on >= 90% of the
    prompts and stops wherever it stops; q8_0 keeps exact match within 5 points; q4_k_m is reported."""
    pytest.importorskip("llama_cpp", reason="needs llama-cpp-python: make gguf (or pip install 'fastft[gguf]')")
    out = tmp_path / "smollm2-demo"
    r = recipe.load(ROOT / "recipes" / "smollm2-demo.yaml", overrides=[f"output.dir={out}", "eval.after_training=false"])
    train.run(r, log=lambda m: None)
    report = export.export(out, ["f16", "q8_0", "q4_k_m"])
    by = {e["quant"]: e for e in report["exports"]}
    for q, e in by.items():
        v = e["verification"]
        print(q, f"{e['bytes'] / 1e6:.1f} MB", e["seconds"], "same answer", v["same_answer"], "stops kept",
              v["stops_kept"], "metric", v["metric_merged"], "->", v["metric_gguf"], f"{v['tokens_per_s']} tok/s")
        assert v["engine"].startswith("llama.cpp")
        assert v["same_tokens"] == 1.0  # llama.cpp's tokenizer gives the same ids for every prompt
    f16, q8, q4 = by["f16"]["verification"], by["q8_0"]["verification"], by["q4_k_m"]["verification"]
    assert f16["same_answer"] >= 0.9 and f16["stops_kept"] == 1.0 and f16["passed"]
    assert abs(q8["metric_gguf"] - q8["metric_merged"]) <= 0.05 and q8["passed"]
    assert q4["metric_gguf"] is not None and not q4["gated"]
    assert by["q4_k_m"]["bytes"] < by["q8_0"]["bytes"] < by["f16"]["bytes"]

"""fastft info: the installed versions against the Makefile's pins, known breakages, --check."""
from __future__ import annotations

from pathlib import Path

import pytest

from fastft import cli, info

ROOT = Path(__file__).resolve().parent.parent

MAKEFILE = """\
TORCH_CPU   := torch==2.13.0
CORE_PINS   := transformers==5.17.0 peft==0.21.2 \\
               tensorboard==2.21.0
GGUF_PINS   := llama-cpp-python==0.3.36
SIDE_TRITON := 3.6.0
HF_PINS      := $(CORE_PINS) trl==1.16.0  # comment
UNSLOTH_PINS := $(CORE_PINS) trl==1.15.0 unsloth==2026.10.9
PIP := -m pip install -q
"""


def _env(**versions):
    versions = {info.canonical(k): v for k, v in versions.items()}
    return lambda name: versions.get(info.canonical(name))


def test_parse_pins_expands_references_and_continuations():
    pins = info.parse_pins(MAKEFILE)
    assert pins["CORE_PINS"] == {"transformers": "5.17.0", "peft": "0.21.2", "tensorboard": "2.21.0"}
    assert pins["HF_PINS"] == {**pins["CORE_PINS"], "trl": "1.16.0"}
    assert pins["UNSLOTH_PINS"]["trl"] == "1.15.0" and pins["UNSLOTH_PINS"]["unsloth"] == "2026.10.9"
    assert "SIDE_TRITON" not in pins and "PIP" not in pins


def test_the_real_makefile_is_the_matrix():
    pins = info.parse_pins((ROOT / "Makefile").read_text())
    assert pins["HF_PINS"]["trl"] == "1.16.0" and pins["UNSLOTH_PINS"]["trl"] == "1.15.0"
    assert "transformers" in pins["CORE_PINS"] and pins["TORCH_CPU"] == {"torch": "2.13.0"}


def test_marks_tested_newer_older_missing(tmp_path):
    mk = tmp_path / "Makefile"
    mk.write_text(MAKEFILE)
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\ndependencies = ["transformers>=5", "peft"]\n')
    r = info.check(mk, get=_env(torch="2.13.0+cpu", transformers="5.18.0", peft="0.20.1", trl="1.16.0"), cuda=False)
    marks = {p.name: p.mark for p in r.packages}
    assert r.entry == "HF_PINS"
    assert marks == {"torch": "tested", "transformers": "newer", "peft": "older", "tensorboard": "missing",
                     "trl": "tested", "llama-cpp-python": "missing"}
    outside = {p.name for p in r.outside}
    assert outside == {"transformers", "peft"}  # tensorboard (not a core dependency) and llama.cpp: optional
    assert not r.in_matrix
    text = info.format_report(r)
    assert "OUTSIDE the tested matrix" in text and "transformers newer" in text


def test_inside_matrix_and_unsloth_entry(tmp_path):
    mk = tmp_path / "Makefile"
    mk.write_text(MAKEFILE)
    same = {"torch": "2.13.0+cpu", "transformers": "5.17.0", "peft": "0.21.2", "tensorboard": "2.21.0"}
    r = info.check(mk, get=_env(**same, trl="1.16.0"), cuda=False)
    assert r.in_matrix and "inside the tested matrix" in info.format_report(r)
    r = info.check(mk, get=_env(**same, trl="1.15.0", unsloth="2026.10.9"), cuda=False)
    assert r.entry == "UNSLOTH_PINS" and r.in_matrix


def test_known_breakages():
    b = info.known_breakages(_env(torch="2.13.0+cpu", trl="1.15.0"), cuda=False)
    assert len(b) == 1 and "trl 1.15.0" in b[0] and "CPU" in b[0] and "pip install trl==1.16.0" in b[0]
    assert info.known_breakages(_env(torch="2.13.0+cpu", trl="1.15.0", unsloth="2026.10.9"), cuda=False) == []
    b = info.known_breakages(_env(torch="2.13.0+cpu", trl="1.15.0", unsloth="2026.10.9", torchvision="0.28.0"),
                             cuda=False)
    assert len(b) == 1 and "import unsloth" in b[0] and "pip uninstall torchvision" in b[0]
    assert info.known_breakages(_env(torch="2.13.0+cpu", unsloth="2026.10.9", torchvision="0.28.0+cpu"),
                                cuda=False) == []
    b = info.known_breakages(_env(torch="2.13.0", unsloth="2026.10.9", trl="1.16.0"), cuda=True)
    assert any("caps trl at 1.15" in x for x in b)


def test_cli_check_exits_1_outside_the_matrix(tmp_path, capsys):
    mk = tmp_path / "Makefile"
    mk.write_text("CORE_PINS := transformers==0.0.1\nHF_PINS := $(CORE_PINS) trl==0.0.1\n"
                  "UNSLOTH_PINS := $(CORE_PINS) unsloth==0.0.1\n")
    assert cli.main(["info", "--check", "--makefile", str(mk)]) == 1
    out = capsys.readouterr().out
    assert "transformers" in out and "newer" in out and "OUTSIDE" in out
    assert cli.main(["info", "--makefile", str(mk)]) == 0  # without --check it only reports


def test_missing_makefile_is_a_clear_error(tmp_path):
    with pytest.raises(info.InfoError, match="--makefile"):
        info.check(tmp_path / "nope" / "Makefile")

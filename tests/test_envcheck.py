"""bench.envcheck's reading of a wheelhouse: Requires-Dist against what is carried and installed, with
markers evaluated for the GPU machine, and the modules a wheel installs."""
from __future__ import annotations

from support import ROOT

from bench import envcheck


def _wheel(name, version, requires, modules=()):
    return envcheck.Wheel(ROOT / f"{name}.whl", name, version, list(requires), list(modules))


def test_unmet_requirements_skip_what_is_carried_installed_or_not_for_this_platform():
    wheels = [_wheel("top", "1.0", ["carried-dep>=2", "installed-dep", "old-dep>=3", "absent-dep",
                                    "windows-only; sys_platform == 'win32'", "extra-only; extra == 'cli'"]),
              _wheel("carried_dep", "2.1", [])]
    installed = {"installed-dep": "", "old-dep": "2.5"}.get
    unmet = envcheck.unmet_requirements(wheels, installed, envcheck.GPU_MARKERS)
    assert [(u.requirement, u.found, u.required_by) for u in unmet] == [
        ("absent-dep", None, ["top"]),  # missing first
        ("old-dep>=3", "2.5", ["top"]),  # installed, outside the declared range
    ]


def test_top_level_modules_are_the_public_packages_and_modules_of_a_wheel():
    names = ["pkg/__init__.py", "pkg/sub.py", "_private/__init__.py", "single.py", "ext.cpython-312-x86_64-linux-gnu.so",
             "nopkg/data.txt", "pkg-1.0.dist-info/METADATA", "pkg-1.0.data/scripts/x"]
    assert envcheck.top_level_modules(names) == ["ext", "pkg", "single"]


def test_gpu_image_lists_the_stack_the_wheelhouse_relies_on():
    image = envcheck.gpu_image()
    for name in ("torch", "triton", "transformers", "peft", "accelerate"):
        assert name in image, name
    assert "unsloth" not in image  # carried, not on the image

import subprocess
import sys

from support import ROOT


def test_kernels_is_fastft_kernels_only():
    import fastft.kernels

    assert fastft.kernels.__name__ == "fastft.kernels"


def test_checkout_folder_does_not_shadow_the_pypi_kernels_package():
    # started from the checkout root, `kernels/` is on sys.path; it must read as "not installed"
    code = (
        "import importlib.util, sys\n"
        "try:\n    import kernels\nexcept ImportError:\n    print('missing'); sys.exit()\n"
        "print('file', getattr(kernels, '__file__', None), 'version', getattr(kernels, '__version__', None))\n"
        "from transformers.utils import import_utils\n"
        "print('transformers sees', import_utils.is_kernels_available())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "missing" in out or ("file None version None" in out and "transformers sees False" in out), out


def test_cli_help_and_info():
    out = subprocess.run([sys.executable, "-m", "fastft.cli", "info"], capture_output=True, text=True, check=True)
    assert "backend auto" in out.stdout and "transformers" in out.stdout
    h = subprocess.run([sys.executable, "-m", "fastft.cli", "--help"], capture_output=True, text=True, check=True)
    assert "train" in h.stdout and "validate" in h.stdout


def test_every_package_folder_is_listed_for_the_wheel():
    # a subpackage missing from [tool.setuptools] packages works in an editable install and is
    # absent from a built wheel
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {"fastft.kernels"} | {
        ".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "fastft").rglob("__init__.py")}
    assert found <= listed, f"add to pyproject.toml [tool.setuptools] packages: {sorted(found - listed)}"

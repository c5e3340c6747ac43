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

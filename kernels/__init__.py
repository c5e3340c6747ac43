"""fastft's Triton kernels, imported as ``fastft.kernels`` (never as a top-level ``kernels``).

The folder sits at the top of the checkout, so a process started there (``python -m bench...``, a
REPL) has it on ``sys.path`` under the name ``kernels``, which is also the PyPI package that
transformers and bitsandbytes import for hub kernels. When imported under that name this file steps
aside: it loads the PyPI package if one is installed, and otherwise leaves an empty module without
``__file__`` or ``__version__``, which transformers' availability check reads as "not installed"
(the same as a stray namespace folder). fastft's own code lives in the submodules: nf4_format and nf4
(NF4 dequantization), lora_configs, lora_kernel and lora (the fused LoRA linear), fused and fused_mlp
(the fused QKV and SwiGLU-MLP ops), segmented_lora (several adapters' LoRA products in one batch).
"""
import sys as _sys

if __name__ == "kernels":
    import importlib as _importlib
    import os as _os

    _root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _saved_path, _self = list(_sys.path), _sys.modules.pop("kernels")
    _sys.path[:] = [p for p in _sys.path if _os.path.abspath(p or ".") != _root]
    try:
        _sys.modules["kernels"] = _importlib.import_module("kernels")  # the PyPI package
    except ImportError:
        _sys.modules["kernels"] = _self
        __file__ = None
        __path__ = []
    finally:
        _sys.path[:] = _saved_path

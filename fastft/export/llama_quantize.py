"""llama.cpp's quantizer through the llama-cpp-python binding: an f16 GGUF in, a k-quant GGUF out.

    python -m fastft.export.llama_quantize model-f16.gguf model-q4_k_m.gguf q4_k_m 8   # threads last

Run by ``llamacpp.quantize`` in a subprocess (a crash in llama.cpp ends it, not the export); exits
with ``llama_model_quantize``'s return code, 0 when the file is written.
"""
from __future__ import annotations

import ctypes
import sys


def main(argv: list[str]) -> int:
    import llama_cpp

    src, dst, quant, threads = argv
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, "LLAMA_FTYPE_MOSTLY_" + quant.upper())
    params.nthread = int(threads)
    return llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

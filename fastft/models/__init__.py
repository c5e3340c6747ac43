"""The model side: which checkpoint a recipe names, its shapes and memory, how it loads, and which
kernels its LoRA layers run.

- ``named``: the embedded models (``fastft-tiny``, ``synthetic:<config>``, ``smollm2-135m-instruct``,
  ``gemma-3-270m``)
- ``smollm2`` / ``gemma3``: SmolLM2-135M-Instruct and Gemma 3 270M from GGUF files on PyPI, converted
  once into the cache (``gguf_source``: what the two share)
- ``provenance``: the base model's fingerprint, and whether a base about to be loaded is that one
- ``shapes``: a config's shapes and exact parameter counts on the meta device; hub ids to shipped configs
- ``vram`` / ``plan``: the VRAM model and ``fastft plan``
- ``backends``: ``load(recipe)`` through Unsloth or transformers + bitsandbytes + PEFT; ``load_run``
- ``sharded_load``: one 4-bit model loaded across the processes of an FSDP job
- ``patch`` / ``compile_regime``: fastft's kernels in the LoRA layers, and whether blocks are compiled

Nothing is imported here: ``import fastft.models`` stays cheap, and each module is imported by name.
"""

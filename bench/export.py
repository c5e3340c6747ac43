"""GGUF export benchmark: size, time and agreement with the merged model, per type, as one result JSON.

    python -m bench.export outputs/smollm2-demo --gguf f16,q8_0,q4_k_m --name smollm2-demo
    python -m bench.export outputs/smollm2-demo --gguf f16,bf16,q8_0,q4_k_m --engine transformers \\
        --name smollm2-demo-transformers

Runs ``fastft.export.export`` (merge, llama.cpp's converter / quantizer, metadata checks, verification)
into a temporary folder without recording it in the run directory (its own exports are left
alone), and writes
``bench/results/export-<name>-<target>-<time>.json`` (bench.common): the device (on a CPU, its model
name and core count) and versions, and
per type the file size, the seconds of each step and the verification summary; the full report,
every prompt with both answers included, under ``report``. The table goes to stderr, the result
as one compact JSON line to stdout, last.
"""
from __future__ import annotations

import argparse
import sys
import tempfile

from bench import common


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.export", description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="a finished run directory")
    p.add_argument("--gguf", action="append", required=True, help="types, as for fastft export")
    p.add_argument("--engine", default="auto", choices=["auto", "llama.cpp", "transformers"])
    p.add_argument("--max-prompts", type=int, default=32)
    p.add_argument("--name", required=True, help="result name, e.g. smollm2-demo")
    p.add_argument("--target", default="cpu", help="label of the machine kind (default cpu)")
    args = p.parse_args(argv)

    from fastft import export

    with tempfile.TemporaryDirectory(prefix="fastft-export-bench.") as out:
        report = export.export(args.run, args.gguf, out=out + "/", overwrite=True, engine=args.engine,
                               max_prompts=args.max_prompts, record=False)
    metrics = {}
    for e in report["exports"]:
        v = {k: val for k, val in e.get("verification", {}).items() if k not in ("per_prompt", "checks")}
        metrics[e["quant"]] = {"bytes": e["bytes"], "seconds": e["seconds"], "sha256": e["sha256"], **v}
    doc = common.result("export", args.name, args.target,
                        config={"run": args.run, "quants": [e["quant"] for e in report["exports"]],
                                "engine": args.engine, "max_prompts": args.max_prompts,
                                "reference": report.get("reference")},
                        metrics=metrics, notes=[f"total {report['seconds']} s, merge included"])
    doc["report"] = report
    path = common.write(doc)
    print(f"wrote {path}", file=sys.stderr)
    print(common.dumps_line({k: v for k, v in doc.items() if k != "report"}))
    return 0 if export.passed(report) else export.VERIFY_EXIT_CODE


if __name__ == "__main__":
    sys.exit(main())

"""The ``fastft`` command.

    fastft train recipes/tiny-demo.yaml                       # train; adapter in output.dir/adapter
    fastft train recipes/tiny-demo.yaml --set train.lr=1e-4 --set lora.r=32
    fastft train recipes/tiny-demo.yaml --resume            # continue from the newest checkpoint
    torchrun --nproc_per_node 2 -m fastft train recipes/tiny-demo.yaml   # data-parallel (DDP)
    fastft eval outputs/tiny-demo [--data FILE] [--regression FILE]   # base vs adapter -> eval.json
    fastft generate outputs/tiny-demo --prompt "What kind of things are red , blue ?"  # stream a reply
    fastft validate recipes/tiny-demo.yaml                    # check a recipe, print it resolved
    fastft info                                               # versions, devices, which backend auto picks
    fastft plan recipes/llama3-8b-qlora-alpaca-rtx4090.yaml --target rtx4090   # peak VRAM; exit 1: does not fit
    fastft merge outputs/tiny-demo --out merged/ --dtype bf16     # adapter merged into the 16-bit base
    fastft export outputs/run --gguf q8_0 --gguf q4_k_m       # GGUF for llama.cpp, verified against the merged model
    fastft registry push outputs/tiny-demo --name demo        # -> demo@v1; list | show | diff | promote | rollback
    fastft registry attach demo@v1 outputs/run/export/run-q8_0.gguf   # store an export with a version

Exit codes: 0 done, 1 the run failed, 2 bad recipe, data or command line, 3 an eval gate failed
(train: the run is saved and marked rejected; --no-gate-exit exits 0) or an export does not answer
like the merged model (the file is kept and marked failed in export.json), 130 / 143 stopped by
SIGINT / SIGTERM after writing a checkpoint (resume with --resume).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from .errors import EXIT_BAD_INPUT, EXIT_GATE
from .hardware import GPU_TARGETS
from .schema import STRATEGIES


def _quiet_libraries() -> None:
    # bitsandbytes' CPU backend looks for optional hub kernels at import and logs a warning that
    # nothing here can act on; transformers' advisory warnings are kept at error level.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastft", description="Speed-first QLoRA trainer driven by one YAML recipe.")
    p.add_argument("--quiet", action="store_true", help="no progress output (bars or progress lines) on stderr")
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train a recipe (or each adapter of a sweep: / adapters: recipe)")
    t.add_argument("recipe", help="path to a recipe .yaml (see recipes/)")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key, e.g. --set train.lr=1e-4 (repeatable)")
    t.add_argument("--resume", action="store_true",
                   help="continue the unfinished run in output.dir from its newest complete checkpoint "
                        "(automatic when output.dir holds an unfinished run of the same recipe)")
    t.add_argument("--overwrite", action="store_true", help="replace a finished (or different) run in output.dir")
    t.add_argument("--no-gate-exit", action="store_true",
                   help="a failed eval gate marks the run rejected but exits 0 (default: exit 3)")
    e = sub.add_parser("eval", help="base model vs adapter on held-out and regression sets; writes eval.json")
    e.add_argument("run", help="a run directory (output.dir of a finished run: fastft.json + adapter/) "
                   "or a registry reference NAME@vN / NAME@production")
    e.add_argument("--data", help="held-out file to score instead of the run's own held-out split "
                   "(dpo / orpo runs: preference rows too, scored against the chosen answer)")
    e.add_argument("--regression", help="regression set (general prompts with answers) instead of eval.regression")
    e.add_argument("--no-gate-exit", action="store_true", help="report failed gates but exit 0 (default: exit 3)")
    _base_args(e)
    g = sub.add_parser("generate", help="stream a reply from base + adapter (interactive without --prompt)")
    g.add_argument("run", help="a run directory (output.dir of a finished run) or a registry reference NAME@vN")
    g.add_argument("--prompt", help="one user message; without it, each line read from stdin is one (until EOF)")
    g.add_argument("--system", help="a system message before each prompt")
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; > 0: sampling")
    g.add_argument("--no-adapter", action="store_true", help="the base model alone (adapter disabled), to compare")
    _base_args(g)
    v = sub.add_parser("validate", help="validate a recipe and print it with every default filled in")
    v.add_argument("recipe")
    v.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    m = sub.add_parser("merge", help="merge the adapter into a 16-bit copy of its base (plain transformers checkpoint)")
    m.add_argument("run", help="a run directory (output.dir of a finished run) or a registry reference NAME@vN")
    m.add_argument("--out", required=True, help="folder for the merged checkpoint")
    m.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="saved dtype (default bf16)")
    m.add_argument("--base", help="16-bit base checkpoint (default: the one the run recorded)")
    m.add_argument("--from-quantized", action="store_true",
                   help="merge into the dequantized 4-bit weights instead of the 16-bit ones (their rounding error stays)")
    m.add_argument("--force", action="store_true", help="merge even when the base differs from the recorded one")
    m.add_argument("--no-verify", action="store_true", help="skip comparing merged logits with base + adapter")
    m.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    m.add_argument("--registry", metavar="DIR", help="registry for NAME@vN references (default: in the cache)")
    x = sub.add_parser("export", help="GGUF files for llama.cpp / Ollama / LM Studio, verified against the merged model")
    x.add_argument("run", help="a run directory (output.dir of a finished run)")
    x.add_argument("--gguf", action="append", required=True, metavar="TYPE",
                   help="f16, bf16, q8_0 (converter only) or a k-quant: q4_k_m, q5_k_m, q6_k, ... (needs "
                        "llama-cpp-python); repeat or comma-separate for several")
    x.add_argument("--out", help="a .gguf file (one type), a folder ending in /, or a name with {quant} "
                   "(default: RUN/export/<run>-<type>.gguf)")
    x.add_argument("--base", help="16-bit base checkpoint to merge into (default: the one the run recorded)")
    x.add_argument("--force", action="store_true", help="export even when the base differs from the recorded one")
    x.add_argument("--overwrite", action="store_true", help="replace existing files")
    x.add_argument("--no-verify", action="store_true", help="skip answering the prompt set with the exported file")
    x.add_argument("--engine", default="auto", choices=["auto", "llama.cpp", "transformers"],
                   help="what verifies the file: llama.cpp when llama-cpp-python is installed (auto), else "
                        "transformers' GGUF loader (logits)")
    x.add_argument("--max-prompts", type=int, default=32, help="held-out prompts in the verification set (default 32)")
    x.add_argument("--max-new-tokens", type=int, help="answer length in the verification (default: "
                   "max(eval.max_new_tokens, 48))")
    reg = sub.add_parser("registry", help="versioned adapters: push, list, show, diff, promote, rollback")
    rs = reg.add_subparsers(dest="action", required=True)
    where = argparse.ArgumentParser(add_help=False)
    where.add_argument("--registry", metavar="DIR", help="registry folder (default: $FASTFT_CACHE/registry)")
    where.add_argument("--json", action="store_true", help="print JSON")
    x = rs.add_parser("push", parents=[where], help="store a finished run as the next version NAME@vN")
    x.add_argument("run_dir")
    x.add_argument("--name", required=True)
    x = rs.add_parser("attach", parents=[where], help="store an exported GGUF with a version (see fastft export)")
    x.add_argument("ref")
    x.add_argument("file")
    x = rs.add_parser("list", parents=[where], help="every version (of NAME)")
    x.add_argument("name", nargs="?")
    x = rs.add_parser("show", parents=[where], help="one version's metadata and integrity (NAME, NAME@vN, NAME@production)")
    x.add_argument("ref")
    x = rs.add_parser("diff", parents=[where], help="hyperparameters and metrics that differ between two versions")
    x.add_argument("ref_a")
    x.add_argument("ref_b")
    x = rs.add_parser("promote", parents=[where], help="give a version the staging or production stage")
    x.add_argument("ref")
    x.add_argument("--stage", required=True, choices=["staging", "production"])
    x.add_argument("--force", action="store_true", help="promote a run its eval gates rejected")
    x = rs.add_parser("rollback", parents=[where], help="move production (or --stage) back to its previous version")
    x.add_argument("name")
    x.add_argument("--stage", default="production", choices=["staging", "production"])
    inf = sub.add_parser("info", help="versions against the tested matrix (the Makefile's pins), devices, the "
                         "backend 'auto' would pick")
    inf.add_argument("--check", action="store_true", help="exit 1 when the environment is outside the tested matrix")
    inf.add_argument("--makefile", help="the Makefile holding the pins (default: the checkout's)")
    rp = sub.add_parser("report", help="RUN/report.html (figures, eval, gates, exports, recipe) + report.md; "
                        "several runs: compare.html side by side")
    rp.add_argument("runs", nargs="+", metavar="RUN", help="run directories (output.dir) or registry references")
    rp.add_argument("--out", help="folder for the files (default: the (first) run's folder)")
    rp.add_argument("--registry", metavar="DIR", help="registry for NAME@vN references (default: in the cache)")
    pl = sub.add_parser("plan", help="estimate peak VRAM from the model config (no weights); exit 1 if it does not fit")
    pl.add_argument("recipe")
    pl.add_argument("--target", default="rtx4090", choices=GPU_TARGETS)
    pl.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    pl.add_argument("--json", action="store_true", help="print the plan as one JSON document")
    pl.add_argument("--gpus", type=int, default=1, help="plan one rank of a run over N GPUs (torchrun / accelerate)")
    pl.add_argument("--strategy", choices=STRATEGIES, help="with --gpus: ddp (each GPU holds the model) or fsdp "
                    "(sharded); default: the recipe's distributed.strategy")
    dt = sub.add_parser("data", help="read, tokenize and cache a recipe's data without training (fastft.data)")
    dt.add_argument("recipe")
    dt.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    dt.add_argument("--json", action="store_true", help="the last line of stdout is one JSON document")
    return p


def _base_args(p) -> None:
    p.add_argument("--registry", metavar="DIR", help="registry for NAME@vN references (default: in the cache)")
    p.add_argument("--base", help="base checkpoint to load the adapter onto (default: the one the run recorded)")
    p.add_argument("--force", action="store_true", help="load even when the base differs from the recorded one")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.quiet:
        from .progress import set_quiet

        set_quiet(True)
    _quiet_libraries()
    from .errors import FastftError

    command = COMMANDS[args.cmd]
    try:
        return command(args)
    except FastftError as e:
        print(f"fastft: error: {e}", file=sys.stderr)
        return e.exit_code
    except FileNotFoundError as e:
        print(f"fastft: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("fastft: interrupted", file=sys.stderr)
        return 130


def _recipe(args):
    from . import recipe

    return recipe.load(args.recipe, args.overrides)


def cmd_train(args) -> int:
    from . import gates, sweep, train

    if sweep.is_set(args.recipe):
        code = sweep.exit_code(sweep.run(sweep.load(args.recipe, args.overrides), overwrite=args.overwrite))
        if code == gates.EXIT_GATE and args.no_gate_exit:
            print("fastft: --no-gate-exit: an adapter's gates failed, exiting 0 anyway", file=sys.stderr)
            return 0
        return code
    result = train.run(_recipe(args), resume=args.resume, overwrite=args.overwrite)
    return gates.gate_exit(result.info, args.no_gate_exit)


def cmd_validate(args) -> int:
    from . import sweep

    if sweep.is_set(args.recipe):
        s = sweep.load(args.recipe, args.overrides)
        print(json.dumps({a.name: a.recipe.to_dict() for a in s.adapters}, indent=2))
        print(f"{args.recipe}: valid, {len(s.adapters)} adapters: {', '.join(a.name for a in s.adapters)}",
              file=sys.stderr)
        return 0
    r = _recipe(args)
    print(json.dumps(r.to_dict(), indent=2))
    print(f"{args.recipe}: valid", file=sys.stderr)
    return 0


def cmd_data(args) -> int:
    """Prepare the data as ``fastft train`` would (the same cache entry), report it, train nothing."""
    import time

    from . import data
    from .models import backends

    r = _recipe(args)
    t0 = time.perf_counter()
    tok = backends.load_tokenizer(r.model.name)
    out = data.prepare(r.data, tok, seed=r.train.seed, max_length=r.model.max_seq_length,
                       log=lambda m: print(f"fastft: {m}", file=sys.stderr), started=t0)
    if args.json:
        print(json.dumps(out))
    else:
        print(_data_report(out))
    return 0


def _data_report(out: dict) -> str:
    c = out["cache"]
    return "\n".join([
        f"rows            {out['rows']:,} ({out['skipped_rows']} skipped)",
        f"examples        {out['train_examples']:,} train / {out['eval_examples']:,} eval",
        f"tokens          {out['tokens']:,} ({out['train_label_tokens']:,} trained)",
        (f"tokenization    {out['tokenizer_path']} ({out['per_example_rows']} rows one at a time, "
         f"{out['num_proc']} processes)"),
        (f"time            {out['seconds']:.1f} s, peak RSS {out['peak_rss_gb']:.2f} GB "
         f"(workers {out['worker_peak_rss_gb']:.2f} GB)"),
        f"cache           {'hit' if c['hit'] else 'built'}: {c['path']}",
        f"data hash       {out['data_hash']}"])


def cmd_plan(args) -> int:
    from . import sweep
    from .models import plan

    if sweep.is_set(args.recipe):
        return _plan_set(sweep.load(args.recipe, args.overrides), args)
    p = plan.plan(_recipe(args), args.target, gpus=args.gpus, strategy=args.strategy)
    print(json.dumps(p.to_dict()) if args.json else plan.format_plan(p))
    return 0 if p.fits else 1


def _plan_set(s, args) -> int:
    """The adapters train one after another: the set's peak is its largest adapter's."""
    from .hardware import GiB
    from .models import plan

    plans = [(a.name, plan.plan(a.recipe, args.target, search=False, gpus=args.gpus, strategy=args.strategy))
             for a in s.adapters]
    if args.json:
        print(json.dumps({name: p.to_dict() for name, p in plans}))
    else:
        name, top = max(plans, key=lambda x: x[1].total_bytes)
        print(plan.format_plan(top).replace("fastft plan:", f"fastft plan (adapter {name}, the largest):", 1))
        print(f"\n  the set: {len(plans)} adapters, trained one after another; planned peak per adapter:")
        for n, p in plans:
            print(f"    {n:32s} {p.total_bytes / GiB:6.2f} GiB  {'fits' if p.fits else 'DOES NOT FIT'}")
    return 0 if all(p.fits for _, p in plans) else 1


def cmd_eval(args) -> int:
    from . import gates, registry

    run_dir = registry.resolve_ref(args.run, args.registry)  # a run directory or NAME@vN / NAME@production
    result = eval_run(run_dir, args.data, args.regression, args.base, args.force)
    return gates.gate_exit(result, args.no_gate_exit)


def eval_run(run_dir, data_file: str | None = None, regression: str | None = None, base: str | None = None,
             force: bool = False, log=print) -> dict:
    """``fastft eval``: load the run, evaluate, write eval.json, print the table; returns the result."""
    from . import evaluate, report
    from .models import backends
    from .eval_table import format_table

    model, tokenizer, r, _ = backends.load_run(run_dir, base, force, log)
    result = evaluate.evaluate_run(model, tokenizer, r, run_dir, data_file, regression, log)
    log(format_table(result, str(run_dir)))
    report.refresh(run_dir, log)  # the run's report.html follows the new eval.json
    return result


def cmd_generate(args) -> int:
    """Stream replies: one for --prompt, else one per stdin line until EOF (each line a new chat)."""
    from . import generate, registry
    from .models import backends
    from .errors import FastftError

    run_dir = registry.resolve_ref(args.run, args.registry)
    if args.temperature < 0 or args.max_new_tokens < 1:
        raise FastftError("--temperature must be >= 0 and --max-new-tokens >= 1")
    model, tokenizer, _, _ = backends.load_run(run_dir, args.base, args.force, log=lambda m: print(m, file=sys.stderr))
    system = [{"role": "system", "content": args.system}] if args.system else []

    def reply(text: str) -> None:
        generate.reply(model, tokenizer, system + [{"role": "user", "content": text}], args.max_new_tokens,
                       args.temperature, adapter=not args.no_adapter)

    if args.prompt is not None:
        reply(args.prompt)
        return 0
    interactive = sys.stdin.isatty()
    if interactive:
        print("fastft: one message per line; Ctrl-D ends", file=sys.stderr)
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            return 0
        if line.strip():
            reply(line.strip())


def cmd_export(args) -> int:
    from . import export, rundir

    report = export.export(args.run, args.gguf, out=args.out, base=args.base, force=args.force,
                           overwrite=args.overwrite, verify=not args.no_verify, engine=args.engine,
                           max_prompts=args.max_prompts, max_new_tokens=args.max_new_tokens)
    if not export.passed(report):
        print(f"fastft: an export does not answer like the merged model (details: {args.run}/{rundir.EXPORT}); "
              f"the file is kept and marked failed (exit {EXIT_GATE})", file=sys.stderr)
        return EXIT_GATE
    return 0


def cmd_merge(args) -> int:
    from . import merge

    merge.merge(args.run, args.out, dtype=args.dtype, base=args.base, from_quantized=args.from_quantized,
                force=args.force, verify=not args.no_verify, overwrite=args.overwrite,
                registry=args.registry, log=lambda m: print(m, file=sys.stderr))
    return 0


def cmd_registry(args) -> int:
    from . import registry, registry_meta

    reg = registry.Registry(args.registry)
    act = args.action
    if act == "push":
        e = reg.push(args.run_dir, args.name)
        print(json.dumps({"ref": e.ref, "files": len(e.manifest)}) if args.json else
              f"pushed {args.run_dir} as {e.ref} ({len(e.manifest)} files, registry {reg.root})")
    elif act == "attach":
        x = reg.attach(args.ref, args.file)
        v = x.get("verification") or {}
        print(json.dumps(x, indent=2, default=str) if args.json else
              f"attached {x['file']} ({x.get('quant') or 'type unknown'}, {x['bytes'] / 1e6:.1f} MB, "
              + ("not verified by fastft export" if not v else "verification " + ("passed" if v.get("passed") else
                                                                                  "FAILED"))
              + f") to {x['ref']}: {x['object']}")
    elif act == "list":
        print(json.dumps([{"ref": e.ref, "created": e.created, "status": e.status} for e in reg.versions(args.name)])
              if args.json else registry_meta.format_list(reg, args.name))
    elif act == "show":
        e = reg.get(args.ref)
        problems = reg.verify(e)
        print(json.dumps({"ref": e.ref, "created": e.created, "status": e.status, "source": e.source,
                          "stages": [s for s, v in reg.stages(e.name).items() if v == e.version],
                          "files": e.manifest, "damaged": problems, "exports": reg.exports(e), "meta": e.meta},
                         indent=2, default=str)
              if args.json else registry_meta.format_show(reg, e))
        return EXIT_BAD_INPUT if problems else 0
    elif act == "diff":
        a, b = reg.get(args.ref_a), reg.get(args.ref_b)
        d = registry_meta.diff(a, b)
        print(json.dumps(d, indent=2, default=str) if args.json else registry_meta.format_diff(a, b, d))
    elif act == "promote":
        e = reg.promote(args.ref, args.stage, force=args.force)
        print(f"{e.ref} is now {args.stage}" + (" (--force: its eval gates rejected it)" if args.force
                                                 and e.status == "rejected" else ""))
    elif act == "rollback":
        old, new = reg.rollback(args.name, args.stage)
        print(f"{args.name}: {args.stage} rolled back from v{old} to v{new}")
    return 0


def cmd_info(args) -> int:
    from . import info

    # the matrix first: it reads package metadata only, so it still answers when torch cannot be imported
    doctor = info.check(args.makefile)
    print(info.format_report(doctor))
    try:
        import torch
    except Exception as e:  # noqa: BLE001 - a broken install is what this command is for
        print(f"fastft: cannot import torch: {type(e).__name__}: {e}")
        return 1

    from . import recipe
    from .models import backends

    print("fastft environment")
    for k, v in info.versions().items():
        print(f"  {k:<13} {v if v is not None else '-'}")
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        print(f"  device        {props.name}, sm_{props.major}{props.minor}, {props.total_memory / 2**30:.1f} GiB")
    else:
        print(f"  device        cpu ({os.cpu_count()} cores, torch threads {torch.get_num_threads()})")
    r = recipe.from_dict({"model": {"name": "x"}, "data": {"train": "x"}, "output": {"dir": "x"}})
    name, why = backends.choose(r)
    print(f"  backend auto  {name} ({why})")
    return 1 if args.check and not doctor.in_matrix else 0


def cmd_report(args) -> int:
    from . import registry, report

    runs = [registry.resolve_ref(r, args.registry) for r in args.runs]
    html_path, md_path = report.write(runs, args.out)
    print(f"{html_path}\n{md_path}")
    return 0


COMMANDS = {"train": cmd_train, "validate": cmd_validate, "plan": cmd_plan, "eval": cmd_eval,
            "generate": cmd_generate, "export": cmd_export, "merge": cmd_merge, "registry": cmd_registry,
            "info": cmd_info, "report": cmd_report, "data": cmd_data}


if __name__ == "__main__":
    sys.exit(main())

"""The ``fastft`` command.

    fastft train recipes/tiny-demo.yaml                       # train; adapter in output.dir/adapter
    fastft train recipes/tiny-demo.yaml --set train.lr=1e-4 --set lora.r=32
    fastft train recipes/tiny-demo.yaml --resume            # continue from the newest checkpoint
    torchrun --nproc_per_node 2 -m fastft train recipes/tiny-demo.yaml   # data-parallel (DDP)
    fastft validate recipes/tiny-demo.yaml                    # check a recipe, print it resolved
    fastft info                                               # versions, devices, which backend auto picks
    fastft plan recipes/llama3-8b-qlora-alpaca-rtx4090.yaml --target rtx4090   # peak VRAM; exit 1: does not fit

Exit codes: 0 done, 1 the run failed, 2 bad recipe, data or command line, 130 / 143 stopped by
SIGINT / SIGTERM after writing a checkpoint (resume with --resume).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys


def _quiet_libraries() -> None:
    # bitsandbytes' CPU backend looks for optional hub kernels at import and logs a warning that
    # nothing here can act on; transformers' advisory warnings are kept at error level.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastft", description="Speed-first QLoRA trainer driven by one YAML recipe.")
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train a recipe")
    t.add_argument("recipe", help="path to a recipe .yaml (see recipes/)")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key, e.g. --set train.lr=1e-4 (repeatable)")
    t.add_argument("--resume", action="store_true",
                   help="continue the unfinished run in output.dir from its newest complete checkpoint "
                        "(automatic when output.dir holds an unfinished run of the same recipe)")
    t.add_argument("--overwrite", action="store_true", help="replace a finished (or different) run in output.dir")
    v = sub.add_parser("validate", help="validate a recipe and print it with every default filled in")
    v.add_argument("recipe")
    v.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    sub.add_parser("info", help="versions, devices and the backend 'auto' would pick")
    pl = sub.add_parser("plan", help="estimate peak VRAM from the model config (no weights); exit 1 if it does not fit")
    pl.add_argument("recipe")
    pl.add_argument("--target", default="rtx4090", choices=["rtx4090", "a100-40", "a100-80", "h100"])
    pl.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    pl.add_argument("--json", action="store_true", help="print the plan as one JSON document")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _quiet_libraries()
    from . import recipe as recipe_mod
    from .backends import BackendError
    from .data import DataError

    try:
        if args.cmd == "info":
            return _info()
        r = recipe_mod.load(args.recipe, args.overrides)
        if args.cmd == "validate":
            print(json.dumps(r.to_dict(), indent=2))
            print(f"{args.recipe}: valid", file=sys.stderr)
            return 0
        if args.cmd == "plan":
            return _plan(r, args.target, args.json)
        from . import train

        train.run(r, resume=args.resume, overwrite=args.overwrite)
        return 0
    except (recipe_mod.RecipeError, DataError, FileNotFoundError) as e:
        print(f"fastft: error: {e}", file=sys.stderr)
        return 2
    except BackendError as e:
        print(f"fastft: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fastft: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        from .train import TrainError

        if isinstance(e, TrainError):
            print(f"fastft: error: {e}", file=sys.stderr)
            return e.exit_code
        raise


def _plan(r, target: str, as_json: bool) -> int:
    from . import plan

    try:
        p = plan.plan(r, target)
    except plan.PlanError as e:
        print(f"fastft: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(p.to_dict()) if as_json else plan.format_plan(p))
    return 0 if p.fits else 1


def _info() -> int:
    import torch

    from . import backends, recipe

    print("fastft environment")
    for k, v in backends.versions().items():
        print(f"  {k:<13} {v if v is not None else '-'}")
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        print(f"  device        {props.name}, sm_{props.major}{props.minor}, {props.total_memory / 2**30:.1f} GiB")
    else:
        print(f"  device        cpu ({os.cpu_count()} cores, torch threads {torch.get_num_threads()})")
    r = recipe.from_dict({"model": {"name": "x"}, "data": {"train": "x"}, "output": {"dir": "x"}})
    name, why = backends.choose(r)
    print(f"  backend auto  {name} ({why})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

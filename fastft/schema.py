"""The recipe schema: one dataclass per section (keys, types, defaults, ranges) and the type and
range checks that validate a value, each answering with the text a ``RecipeError`` lists.

    from fastft.schema import TrainConfig, check_type, range_problem
    TrainConfig().lr                         # 0.0002
    check_type(16, int)                      # (True, 16, "")
    check_type("16", int)                    # (False, None, "expected an integer, got a string '16'")
    range_problem(0.0, 0.0, 1.0, True, False)  # "must be > 0.0, got 0.0"

Every field has a default; ``fastft.recipe`` builds these from YAML, and requires ``model.name``,
``data.train`` and ``output.dir``.
"""
from __future__ import annotations

import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Union

from .fmt import did_you_mean
from .gates import METRICS

TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio")  # train.report_to (fastft.trackers)
FORMATS = ("alpaca", "messages", "text", "preference", "sharegpt")  # data.format (fastft.data.formats)
MIX_FORMATS = tuple(f for f in FORMATS if f != "preference")  # data.mix entries hold SFT rows
STRATEGIES = ("ddp", "fsdp")  # distributed.strategy besides auto (fastft.distributed); `fastft plan --strategy`


# --- the sections ----------------------------------------------------------------------------
# `metadata=_range(lo, hi)`: a numeric range, inclusive unless lo_open / hi_open; `None` bounds are open.

def _range(lo=None, hi=None, lo_open=False, hi_open=False):
    return {"check": (lo, hi, lo_open, hi_open)}


@dataclass
class ModelConfig:
    name: str = ""  # hub id, local path, or an embedded model: fastft-tiny
    max_seq_length: int = field(default=2048, metadata=_range(8, 1 << 20))
    load_in_4bit: bool = True  # QLoRA (NF4 + double quant); false: 16-bit LoRA
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"  # compute dtype; auto: bf16 on GPUs that have it, fp32 on CPU
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"
    adapter: str | None = None  # start from a finished run's adapter: its RUN_DIR or a registry NAME@vN (SFT -> DPO/GRPO)


@dataclass
class LoraConfig:
    r: int = field(default=16, metadata=_range(1, 4096))  # higher: more capacity, more memory
    alpha: float = field(default=16.0, metadata=_range(0, None, lo_open=True))
    dropout: float = field(default=0.0, metadata=_range(0.0, 1.0, hi_open=True))  # 0 keeps the fused fast path
    target_modules: Union[str, list[str]] = "all-linear"
    use_dora: bool = False
    use_rslora: bool = False  # scale by alpha/sqrt(r) instead of alpha/r


@dataclass
class DataConfig:
    train: str = ""  # local .jsonl/.json/.csv/.parquet, "asset:..." (shipped), or a hub dataset id; resolved at load
    format: Literal[FORMATS] = "alpaca"  # preference: prompt, chosen, rejected (dpo, orpo); sharegpt: conversations [{from, value}]
    eval: str | None = None  # a separate held-out file; otherwise eval_fraction of train is held out
    eval_fraction: float = field(default=0.05, metadata=_range(0.0, 1.0, hi_open=True))
    packing: bool = False  # pack short examples into max_seq_length rows (no cross-attention between them)
    train_on_responses_only: bool = True  # mask prompt tokens out of the loss
    text_field: str = "text"  # column used by format: text
    split: str = "train"  # split name for hub datasets
    max_examples: int | None = field(default=None, metadata=_range(1, None))
    skip_bad_rows: bool = False  # skip malformed or invalid rows (counted and reported) instead of stopping
    num_proc: int | None = field(default=None, metadata=_range(1, 1024))  # tokenizing processes; None: the cores available
    # general data mixed into the training split: [{path: FILE | name: general, fraction: 0.15, format: ...}];
    # fraction = share of the final training set (see fastft.data.mix_counts); at load each entry gets its
    # resolved file as `path`
    mix: list[dict] | None = None


@dataclass
class TrainConfig:
    batch_size: int = field(default=2, metadata=_range(1, 65536))
    grad_accum: int = field(default=4, metadata=_range(1, 65536))
    lr: float = field(default=2e-4, metadata=_range(0.0, 1.0, lo_open=True))
    scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup", "cosine_with_restarts",
                       "polynomial", "inverse_sqrt"] = "cosine"
    warmup_ratio: float = field(default=0.1, metadata=_range(0.0, 1.0))
    max_steps: int | None = field(default=None, metadata=_range(1, None))  # wins over epochs when set
    epochs: float = field(default=1.0, metadata=_range(0.0, None, lo_open=True))
    optim: Literal["adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "adamw_torch"] = "adamw_8bit"
    weight_decay: float = field(default=0.0, metadata=_range(0.0, None))
    max_grad_norm: float = field(default=1.0, metadata=_range(0.0, None))
    gradient_checkpointing: Union[bool, Literal["unsloth"]] = True  # "unsloth": offload activations (unsloth backend)
    seed: int = 3407
    eval_every: int | None = field(default=None, metadata=_range(1, None))  # steps; None: only at the end
    eval_batch_size: int | None = field(default=None, metadata=_range(1, 65536))  # None: max(batch_size, 8); long sequences want 1
    early_stopping_patience: int | None = field(default=None, metadata=_range(1, None))  # evals without improvement (the pre-training eval counts)
    logging_every: int = field(default=10, metadata=_range(1, None))
    save_every: int | None = field(default=None, metadata=_range(1, None))  # steps between resumable checkpoints
    keep_checkpoints: int = field(default=2, metadata=_range(1, None))  # newest complete checkpoints kept
    max_nonfinite_steps: int = field(default=10, metadata=_range(0, None))  # NaN/Inf steps skipped before stopping
    report_to: list[str] | None = None  # experiment trackers, any of TRACKERS (fastft.trackers)
    # sft | dpo, orpo (preference pairs: data.format preference) | grpo (sampled answers scored by train.reward);
    # see docs/methods.md
    method: Literal["sft", "dpo", "orpo", "grpo"] = "sft"
    beta: float | None = field(default=None, metadata=_range(0.0, None))  # None: dpo 0.1 (KL strength), orpo 0.1 (odds-ratio weight), grpo 0.04 (KL weight)
    sft_weight: float = field(default=0.0, metadata=_range(0.0, None))  # dpo: + this x the chosen answers' cross-entropy (keeps their likelihood up)
    reward: str | None = None  # grpo: exact_match | contains | json_match (None: eval.metric), or module:function
    reward_fields: list[str] | None = None  # json_match reward: fields scored, partial credit each (None: eval.json_fields)
    reward_format: float = field(default=0.0, metadata=_range(0.0, None))  # grpo: weight of a reward for the reference's form (JSON that parses)
    reward_length_penalty: float = field(default=0.0, metadata=_range(0.0, None))  # grpo: minus this per token beyond the reference's length
    num_generations: int = field(default=4, metadata=_range(2, 256))  # grpo: answers sampled per prompt (the group)
    max_completion_length: int = field(default=48, metadata=_range(1, 1 << 16))  # grpo: tokens per sampled answer
    temperature: float = field(default=0.9, metadata=_range(0.0, None, lo_open=True))  # grpo: sampling temperature


@dataclass
class EvalConfig:
    """Base vs adapter after training and in ``fastft eval`` (see fastft.evaluate)."""

    metric: Literal[METRICS] = "exact_match"  # how a held-out answer is scored (fastft.metrics)
    json_fields: list[str] | None = None  # json_match: compare only these fields (None: the whole object)
    regression: str | None = None  # general prompts the base answers right (path or asset:...); None: none
    regression_metric: Literal[METRICS] = "contains"
    # metric path -> condition, e.g. {task.exact_match: ">= 0.8", regression.forgotten: "<= 0.05"}
    gates: dict[str, str] = field(default_factory=dict, metadata={"flatten": True})
    after_training: bool = True  # fastft train runs this evaluation at the end (gates need it)
    max_examples: int | None = field(default=None, metadata=_range(1, None))  # held-out prompts answered (None: all)
    max_new_tokens: int = field(default=32, metadata=_range(1, 4096))  # generation budget per answer
    batch_size: int = field(default=32, metadata=_range(1, 65536))  # prompts per generate / loss batch (larger: faster on CPU too)


@dataclass
class OutputConfig:
    dir: str = ""


@dataclass
class DistributedConfig:
    """How several processes (torchrun / accelerate launch) share the work; see fastft.distributed."""

    strategy: Literal[("auto", *STRATEGIES)] = "auto"  # auto: ddp. fsdp: shard the 4-bit base + LoRA per layer
    cpu_offload: bool = False  # fsdp: keep parameter shards (and the optimizer step) in host memory


# --- checking a value ------------------------------------------------------------------------

def type_name(v) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number", type(None): "null"}.get(type(v), type(v).__name__)


def check_type(value, tp) -> tuple[bool, Any, str]:
    """(ok, coerced value, problem). The problem reads "expected <what>, got <value>"."""
    ok, coerced, want = match_type(value, tp)
    if ok:
        return True, coerced, ""
    if typing.get_origin(tp) is Literal:
        hint = did_you_mean(value, typing.get_args(tp)) if isinstance(value, str) else ""
        return False, None, f"must be one of {want}, got {value!r}{hint}"
    return False, None, f"expected {want}, got {type_name(value)} {value!r}"


def match_type(value, tp) -> tuple[bool, Any, str]:
    """(ok, coerced value, description of what tp accepts)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        wants = []
        for arg in typing.get_args(tp):
            ok, v, want = match_type(value, arg)
            if ok:
                return True, v, ""
            wants.append(want)
        return False, None, " or ".join(wants)
    if origin is Literal:
        allowed = typing.get_args(tp)
        ok = any(value == a and type(value) is type(a) for a in allowed)
        return ok, value, ", ".join(repr(a) for a in allowed)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        ok = isinstance(value, list) and bool(value) and all(isinstance(v, item_tp) for v in value)
        return ok, list(value) if ok else None, f"a non-empty list of {type_name(item_tp()).split()[-1]}s"
    if tp is type(None):
        return value is None, None, "null"
    if tp is bool:
        return isinstance(value, bool), value, "true or false"
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value, "an integer"
    if tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else None, "a number"
    if tp is str:
        return isinstance(value, str), value, "a string"
    raise TypeError(f"unsupported schema type {tp}")  # a bug in the schema, not in the recipe


def range_problem(v, lo, hi, lo_open, hi_open) -> str | None:
    if lo is not None and (v < lo or (lo_open and v == lo)):
        return f"must be {'>' if lo_open else '>='} {lo}, got {v}"
    if hi is not None and (v > hi or (hi_open and v == hi)):
        return f"must be {'<' if hi_open else '<='} {hi}, got {v}"
    return None

"""Recipes: one YAML file drives a whole run.

    from fastft import recipe
    r = recipe.load("recipes/tiny-demo.yaml", overrides=["train.lr=1e-4", "lora.r=32"])
    r.train.lr, r.lora.r    # -> 0.0001, 32

The schema is the section dataclasses of ``fastft.schema``; every field has a default except
``model.name``, ``data.train`` and ``output.dir``. Validation never builds anything (no model, no
tokenizer): it checks keys, types and ranges and reports *all* problems in one ``RecipeError``, each
naming its key path, and for unknown keys the closest valid one. Paths (data.train, data.eval,
data.mix, eval.regression) are resolved once, at load: ``asset:`` to the shipped assets folder,
relative paths beside the recipe file when one is there.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import FastftError
from .fmt import closest, did_you_mean
from .gates import METRICS, GateError, parse_gate
from .schema import (MIX_FORMATS, TRACKERS, DataConfig, DistributedConfig, EvalConfig, LoraConfig, ModelConfig, OutputConfig,
                     TrainConfig, check_type as _check_type, match_type as _match, range_problem as _range_problem,
                     type_name as _tname)


class RecipeError(FastftError, ValueError):
    """A recipe that cannot run; the message lists every problem with its key path."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = problems
        head = f"invalid recipe {source}" if source else "invalid recipe"
        super().__init__(head + ":\n" + "\n".join(f"  - {p}" for p in problems))


@dataclass
class Recipe:
    model: ModelConfig = field(default_factory=ModelConfig)
    backend: Literal["auto", "unsloth", "hf"] = "auto"
    kernels: Literal["auto", "fastft", "unsloth", "none"] = "auto"
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    source: str | None = field(default=None, metadata={"internal": True})  # the file it came from

    def to_dict(self) -> dict[str, Any]:
        """The recipe as loaded, paths resolved; a ``data.mix`` entry given by ``name`` is kept as
        the name (its resolved file is found again when the dict is loaded)."""
        d = dataclasses.asdict(self)
        d.pop("source")
        if d["data"]["mix"]:
            d["data"]["mix"] = [{k: v for k, v in e.items() if not (k == "path" and e.get("name") is not None)}
                                for e in d["data"]["mix"]]
        return d

    def resolve_path(self, value: str) -> str:
        """A path given beside this recipe (a command-line file), resolved as the recipe's own are."""
        return resolve_path(value, _recipe_dir(self.source))


REQUIRED = ("model.name", "data.train", "output.dir")
ASSETS = Path(__file__).resolve().parent / "assets"
# data.mix `name:` -> a dataset shipped with fastft (alpaca format); see fastft/assets/build_demo_data.py
MIX_SETS = {"general": "asset:data/general-instructions.jsonl"}
MIX_KEYS = ("path", "name", "fraction", "format")
# keys that recipes used to have -> what to set instead
REMOVED_KEYS = {
    "train.eval_generate": "train.eval_generate was removed: the evaluation at the end of fastft train answers "
                           "the held-out prompts with the base and the adapter (eval.*); set eval.max_examples "
                           "(how many prompts; default all) and eval.max_new_tokens instead",
    "train.max_new_tokens": "train.max_new_tokens was removed: set eval.max_new_tokens (the generation budget of "
                            "the evaluation at the end of fastft train)",
}


def without_removed_keys(raw: dict) -> dict:
    """A recipe recorded by an older fastft (a run's fastft.json) minus the keys since removed, so
    the record still loads; a recipe file a user edits gets the error naming the new key instead."""
    out = _deepcopy(raw)
    for key in REMOVED_KEYS:
        section, name = key.split(".")
        if isinstance(out.get(section), dict):
            out[section].pop(name, None)
    return out


def from_record(info: dict) -> "Recipe":
    """The recipe a run recorded in its fastft.json (``recipe`` and ``recipe_source``)."""
    return from_dict(without_removed_keys(info["recipe"]), source=info.get("recipe_source"))


def resolve_path(value: str, recipe_dir: str | Path | None = None) -> str:
    """A data path as a recipe gives it: ``asset:NAME`` is the shipped assets folder; a relative
    path is taken beside the recipe when that file exists, else kept as given (the working
    directory, or a hub dataset id such as ``org/name``)."""
    if value.startswith("asset:"):
        return str(ASSETS / value[len("asset:"):])
    p = Path(value).expanduser()
    if not p.is_absolute() and recipe_dir is not None:
        beside = Path(recipe_dir) / p
        if beside.exists():
            return str(beside)
    return str(p)


def _recipe_dir(source: str | None) -> Path | None:
    return Path(source).resolve().parent if source else None


def _resolve_paths(r: Recipe) -> None:
    """Resolve every path-valued key once, at load: data.train, data.eval, eval.regression and
    each data.mix entry (a ``name`` gets its shipped file as ``path`` beside it)."""
    where = _recipe_dir(r.source)
    r.data.train = resolve_path(r.data.train, where)
    if r.data.eval is not None:
        r.data.eval = resolve_path(r.data.eval, where)
    if r.eval.regression is not None:
        r.eval.regression = resolve_path(r.eval.regression, where)
    if r.model.adapter is not None:  # a registry NAME@vN stays as given (no such file)
        r.model.adapter = resolve_path(r.model.adapter, where)
    if r.data.mix:
        r.data.mix = [{**e, "path": resolve_path(MIX_SETS[e["name"]] if e.get("name") is not None else e["path"],
                                                 where)} for e in r.data.mix]


# --- loading and validation --------------------------------------------------------------------

def load(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe file. Raises RecipeError or FileNotFoundError."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe not found: {path} (give the path of a .yaml file; see recipes/)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise RecipeError([f"not valid YAML: {e}"], str(path)) from None
    return from_dict(raw if raw is not None else {}, overrides, source=str(path))


def from_dict(raw: Any, overrides: list[str] | None = None, source: str | None = None) -> Recipe:
    """Validate a recipe mapping (overrides applied first); its paths are resolved beside
    ``source``, the recipe file it came from (see ``resolve_path``)."""
    if not isinstance(raw, dict):
        raise RecipeError([f"the top level must be a mapping of sections, got {type(raw).__name__}"], source)
    if "sweep" in raw or "adapters" in raw:
        raise RecipeError(["sweep: / adapters: make this a set of adapters, not one run: `fastft train`, "
                           "`fastft plan` and `fastft validate` take it (fastft.sweep)"], source)
    raw = _deepcopy(raw)
    problems: list[str] = []
    for item in overrides or []:
        _apply_override(raw, item, problems)
    recipe = _build(Recipe, raw, "", problems)
    if not problems:
        for key in REQUIRED:
            section, name = key.split(".")
            if not getattr(getattr(recipe, section), name):
                problems.append(f"{key}: required, but missing or empty")
    if not problems:
        _cross_checks(recipe, problems)
    if problems:
        raise RecipeError(problems, source)
    recipe.source = source
    _resolve_paths(recipe)
    return recipe


def parse_override(item: str) -> tuple[list[str], Any]:
    """``train.lr=1e-4`` -> (["train", "lr"], 0.0001); values are read as YAML scalars/lists."""
    if "=" not in item:
        raise ValueError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.lr=1e-4")
    key, value = item.split("=", 1)
    parts = [p for p in key.strip().split(".")]
    if not all(parts):
        raise ValueError(f"--set {item!r}: empty key part in {key!r}")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    # YAML 1.1 reads "1e-4" as a string; take it as the number the user meant
    if isinstance(parsed, str):
        try:
            parsed = float(parsed) if any(c in parsed for c in ".eE") else int(parsed)
        except ValueError:
            pass
    return parts, parsed


def _apply_override(raw: dict, item: str, problems: list[str]) -> None:
    try:
        parts, value = parse_override(item)
    except ValueError as e:
        problems.append(str(e))
        return
    node = raw
    for i, p in enumerate(parts[:-1]):
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            problems.append(f"--set {item}: {'.'.join(parts[:i + 1])} is not a section")
            return
        node = nxt
    node[parts[-1]] = value


def _deepcopy(x):
    if isinstance(x, dict):
        return {k: _deepcopy(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_deepcopy(v) for v in x]
    return x


def _build(cls, raw: Any, prefix: str, problems: list[str]):
    """Instantiate dataclass `cls` from a mapping, collecting problems instead of raising."""
    where = prefix.rstrip(".") or "recipe"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        problems.append(f"{where}: expected a mapping of keys, got {_tname(raw)} {raw!r}")
        return cls()
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in raw.items():
        path = f"{prefix}{key}"
        if path in REMOVED_KEYS:
            problems.append(REMOVED_KEYS[path])
            continue
        if key not in fields:
            problems.append(_unknown_key(path, key, fields, prefix, prefixes=True))
            continue
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            values[key] = _build(tp, value, path + ".", problems)
            continue
        if typing.get_origin(tp) is dict:
            values[key] = _build_dict(tp, value, path, fields[key].metadata.get("flatten", False), problems)
            continue
        ok, coerced, why = _check_type(value, tp)
        if not ok:
            problems.append(f"{path}: {why}")
            continue
        rng = fields[key].metadata.get("check")
        if rng is not None and coerced is not None and not isinstance(coerced, bool):
            msg = _range_problem(coerced, *rng)
            if msg:
                problems.append(f"{path}: {msg}")
                continue
        values[key] = coerced
    return cls(**values)


def _build_dict(tp, raw: Any, path: str, flatten: bool, problems: list[str]) -> dict:
    """A ``dict[K, V]`` field; each bad entry is a problem naming its own key. With ``flatten``,
    nested mappings join their keys with dots ({task: {exact_match: x}} -> {"task.exact_match": x}),
    which is also what ``--set eval.gates.task.exact_match=...`` builds."""
    key_tp, value_tp = typing.get_args(tp)
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        problems.append(f"{path}: expected a mapping, got {_tname(raw)} {raw!r}")
        return {}
    items = list(raw.items())
    out = {}
    while items:
        k, v = items.pop(0)
        if flatten and isinstance(v, dict) and v:
            items[:0] = [(f"{k}.{k2}", v2) for k2, v2 in v.items()]
            continue
        ok_key, k2, want_key = _match(k, key_tp)
        if not ok_key:
            problems.append(f"{path}: key {k!r} must be {want_key}")
            continue
        ok, coerced, why = _check_type(v, value_tp)
        if not ok:
            problems.append(f"{path}.{k}: {why}")
            continue
        out[k2] = coerced
    return out


def _unknown_key(path: str, key, valid, prefix: str = "", prefixes: bool = False) -> str:
    """The problem for an unknown key: the valid key it is closest to, else every valid key."""
    close = closest(key, valid, prefixes)
    hint = f"; did you mean '{prefix}{close}'?" if close is not None else f"; valid keys: {', '.join(valid)}"
    return f"{path}: unknown key{hint}"


def _cross_checks(r: Recipe, problems: list[str]) -> None:
    if isinstance(r.lora.target_modules, str) and r.lora.target_modules != "all-linear":
        problems.append(
            f"lora.target_modules: a string must be 'all-linear', got {r.lora.target_modules!r} "
            "(or give a list such as [q_proj, k_proj, v_proj, o_proj])"
        )
    if r.train.gradient_checkpointing == "unsloth" and r.backend == "hf":
        problems.append("train.gradient_checkpointing: 'unsloth' needs backend unsloth or auto; use true with backend hf")
    if r.data.eval is not None and r.data.eval_fraction not in (0.0, 0.05):
        problems.append("data.eval_fraction: set it only when data.eval is not given (a separate eval file wins)")
    if r.data.format == "text" and r.data.train_on_responses_only:
        # plain text has no prompt/response split; treat as a clear configuration error
        problems.append("data.train_on_responses_only: format 'text' has no responses; set it to false")
    if r.data.mix is not None:
        _check_mix(r.data.mix, problems)
    if r.train.early_stopping_patience and not r.train.eval_every:
        problems.append("train.early_stopping_patience: needs train.eval_every (steps between held-out evaluations)")
    if r.eval.json_fields is not None and "json_match" not in (r.eval.metric, r.eval.regression_metric):
        problems.append("eval.json_fields: only used by metric json_match; set eval.metric: json_match or remove it")
    for path, condition in r.eval.gates.items():
        try:
            parse_gate(path, condition, r.eval)
        except GateError as e:
            problems.append(f"eval.gates.{path}: {e}")
    _check_method(r, problems)
    for name in r.train.report_to or []:
        if name not in TRACKERS:
            problems.append(f"train.report_to: unknown tracker {name!r}; choose from {', '.join(TRACKERS)}")


def _check_mix(mix: list[dict], problems: list[str]) -> None:
    """data.mix entries: {path | name, fraction, format?}; fractions are shares of the final
    training set, each in (0, 1), together below 1 (the rest is data.train)."""
    total = 0.0
    for i, entry in enumerate(mix):
        where = f"data.mix[{i}]"
        for key in entry:
            if key not in MIX_KEYS:
                problems.append(_unknown_key(f"{where}.{key}", key, MIX_KEYS))
        has_path, has_name = entry.get("path") is not None, entry.get("name") is not None
        if has_path == has_name:
            problems.append(f"{where}: give exactly one of path (a data file) or name (a shipped set: "
                            f"{', '.join(MIX_SETS)}), got {'both' if has_path else 'neither'}")
        if has_path and (not isinstance(entry["path"], str) or not entry["path"]):
            problems.append(f"{where}.path: expected a file path, got {_tname(entry['path'])} {entry['path']!r}")
        if has_name and entry["name"] not in MIX_SETS:
            hint = did_you_mean(entry["name"], MIX_SETS)
            problems.append(f"{where}.name: unknown shipped set {entry['name']!r}{hint}; shipped: "
                            f"{', '.join(MIX_SETS)} (or give path: FILE)")
        if "format" in entry and entry["format"] not in MIX_FORMATS:
            problems.append(f"{where}.format: must be one of {', '.join(map(repr, MIX_FORMATS))}, got {entry['format']!r}")
        f = entry.get("fraction")
        if f is None:
            problems.append(f"{where}.fraction: required: the share of the final training set, e.g. 0.15")
        elif isinstance(f, bool) or not isinstance(f, (int, float)):
            problems.append(f"{where}.fraction: expected a number, got {_tname(f)} {f!r}")
        elif not 0.0 < f < 1.0:
            problems.append(f"{where}.fraction: must be > 0 and < 1 (a share of the training set), got {f}")
        else:
            total += f
    if total >= 1.0:
        problems.append(f"data.mix: fractions sum to {total:g}; they are shares of the final training set, so "
                        "together they must stay below 1 (the rest is data.train)")


GRPO_ONLY = ("reward", "reward_fields", "reward_format", "reward_length_penalty", "num_generations",
             "max_completion_length", "temperature")


def _check_method(r: Recipe, problems: list[str]) -> None:
    """train.method against the data format and the method's own keys (see fastft.methods)."""
    t, m = r.train, r.train.method
    if m in ("dpo", "orpo") and r.data.format != "preference":
        problems.append(f"train.method: {m} trains on preference pairs; set data.format: preference "
                        "(rows with prompt, chosen, rejected; see docs/methods.md)")
    if r.data.format == "preference" and m not in ("dpo", "orpo"):
        problems.append(f"data.format: preference rows train with train.method dpo or orpo, not {m}")
    if m == "grpo" and r.data.format not in ("alpaca", "messages"):
        problems.append("train.method: grpo samples answers to prompts and scores them against a reference answer; "
                        "use data.format alpaca or messages (the reference is the output / last assistant turn)")
    if m != "sft" and r.data.mix:
        problems.append(f"data.mix: mixes supervised rows into SFT; with train.method {m} set data.mix: null")
    if m != "sft" and r.data.packing:
        problems.append(f"data.packing: only train.method sft packs examples; set it to false for {m}")
    defaults = TrainConfig()
    if m != "dpo" and t.sft_weight != defaults.sft_weight:
        problems.append(f"train.sft_weight: only used by train.method: dpo (method is {m}); remove it"
                        + (" (orpo has its own SFT term)" if m == "orpo" else ""))
    if m != "grpo":
        for key in GRPO_ONLY:
            if getattr(t, key) != getattr(defaults, key):
                problems.append(f"train.{key}: only used by train.method: grpo (method is {m}); remove it")
        return
    if (t.batch_size * t.grad_accum) % t.num_generations:
        problems.append(f"train.num_generations: {t.num_generations} answers per prompt must divide "
                        f"train.batch_size x train.grad_accum = {t.batch_size * t.grad_accum} (the answers scored "
                        "per step, whole groups only)")
    if t.eval_every:
        problems.append("train.eval_every: grpo has no held-out loss to track during training; remove it "
                        "(the evaluation at the end still runs)")
    if t.reward is not None and ":" in t.reward:
        mod, _, fn = t.reward.partition(":")
        if not all(p.isidentifier() for p in mod.split(".")) or not fn.isidentifier():
            problems.append(f"train.reward: {t.reward!r} is not module:function (e.g. my_rewards:score, importable "
                            "from the working directory or the recipe's folder)")
    elif t.reward is not None and t.reward not in METRICS:
        hint = did_you_mean(t.reward, METRICS)
        problems.append(f"train.reward: unknown metric {t.reward!r}{hint}; use one of {', '.join(METRICS)} "
                        "or module:function for a Python reward")
    metric = t.reward or r.eval.metric
    if t.reward_fields is not None and metric != "json_match":
        problems.append(f"train.reward_fields: only used by the json_match reward (the reward is {metric}); "
                        "set train.reward: json_match or remove it")

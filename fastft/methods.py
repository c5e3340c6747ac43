"""The methods past SFT on the same recipe: DPO, ORPO (preference pairs) and GRPO (sampled answers
scored by the recipe's reward), each TRL's trainer with fastft's meter, guard and checkpoints.

    from fastft import methods
    methods.start_from(model, recipe, log)          # model.adapter: an SFT run's adapter weights
    trainer = methods.make_trainer(recipe, model, tokenizer, md, sft_args, callbacks=[...], meter=..., ...)
    methods.finish(model)                           # drop the frozen reference adapter before saving

QLoRA throughout, one base in memory: the reference policy of DPO and GRPO's KL term is the same
model with the adapter disabled when the run starts from a fresh adapter (TRL's "ref" adapter is
removed), and a frozen copy of the starting adapter (LoRA weights only, a few MB) when it starts
from ``model.adapter``, so the run is anchored to the SFT model it improves. ORPO needs no reference.
DPO with ``train.sft_weight`` > 0 adds that weight x the chosen answers' cross-entropy to its loss.

Metrics (metrics.jsonl and fastft.json ``metrics.method``): DPO/ORPO ``rewards/chosen``,
``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies``; GRPO ``reward``, ``reward_std``,
each reward's ``rewards/<name>/mean``, and ``kl`` (with ``train.beta`` > 0).

Imports TRL: import it after the backend has loaded the model (Unsloth patches TRL as it is imported).
"""
from __future__ import annotations

import json
from pathlib import Path

from .errors import FastftError

DEFAULT_BETA = {"dpo": 0.1, "orpo": 0.1, "grpo": 0.04}
# TrainingArguments keys fastft sets for SFT (fastft.train) that every method shares
SHARED_ARGS = (
    "output_dir", "per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
    "learning_rate", "lr_scheduler_type", "warmup_steps", "max_steps", "num_train_epochs", "optim", "weight_decay",
    "max_grad_norm", "seed", "data_seed", "logging_steps", "logging_first_step", "eval_strategy", "eval_steps",
    "save_strategy", "save_steps", "save_total_limit", "save_only_model", "ddp_find_unused_parameters", "report_to",
    "gradient_checkpointing", "bf16", "fp16", "disable_tqdm", "use_cpu",
)
# what fastft.json keeps of each method's own logged figures (the last logged value and the mean)
FIGURES = {
    "dpo": ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"),
    "orpo": ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "nll_loss",
             "log_odds_ratio"),
    "grpo": ("reward", "reward_std", "kl", "completions/mean_length", "frac_reward_zero_std"),
}


class MethodError(FastftError, ValueError):
    """A method this run cannot use as configured; the message says what to change."""


# --- starting from an SFT run ------------------------------------------------------------------

def adapter_dir(ref: str) -> Path:
    """model.adapter (a run directory or a registry NAME@vN) -> the run's adapter/ folder."""
    from . import registry, rundir

    run = registry.resolve_ref(ref)
    path = rundir.RunDir(run).adapter
    if not (path / "adapter_config.json").is_file():
        raise MethodError(f"model.adapter: {run} has no adapter (adapter/adapter_config.json missing); give the "
                          "output.dir of a finished run or a registry reference NAME@vN")
    return path


def start_from(model, recipe, log=print) -> dict | None:
    """Load ``model.adapter``'s weights into the freshly added adapter (same LoRA shape required)."""
    if not recipe.model.adapter:
        return None
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = adapter_dir(recipe.model.adapter)
    cfg = json.loads((path / "adapter_config.json").read_text())
    run_info = path.parent / "fastft.json"
    if run_info.is_file():
        trained_on = json.loads(run_info.read_text()).get("recipe", {}).get("model", {}).get("name")
        if trained_on and trained_on != recipe.model.name:
            raise MethodError(f"model.adapter: {recipe.model.adapter} was trained on {trained_on}, this recipe's "
                              f"model.name is {recipe.model.name}; use the same base model")
    lora = recipe.lora
    wrong = [f"lora.{k}: {mine} here, {theirs} in the adapter" for k, mine, theirs in (
        ("r", lora.r, cfg.get("r")), ("alpha", lora.alpha, cfg.get("lora_alpha")),
        ("use_dora", lora.use_dora, cfg.get("use_dora", False)),
        ("use_rslora", lora.use_rslora, cfg.get("use_rslora", False))) if theirs is not None and mine != theirs]
    if wrong:
        raise MethodError(f"model.adapter: {recipe.model.adapter} has another LoRA shape ({'; '.join(wrong)}); "
                          "set the recipe's lora section to the adapter's")
    weights = path / "adapter_model.safetensors"
    state = load_file(str(weights))
    result = set_peft_model_state_dict(model, state, adapter_name="default")
    missing_lora = [k for k in result.missing_keys if "lora_" in k]
    if result.unexpected_keys or missing_lora:
        raise MethodError(f"model.adapter: {weights} does not fit this model's LoRA layers ("
                          f"{len(result.unexpected_keys)} unexpected, {len(missing_lora)} missing, e.g. "
                          f"{(result.unexpected_keys or missing_lora)[0]}); check lora.target_modules")
    log(f"fastft: starting from the adapter of {recipe.model.adapter} ({len(state)} tensors)")
    return {"adapter": recipe.model.adapter, "path": str(path)}


# --- trainers ----------------------------------------------------------------------------------

def _trainer_classes(method: str):
    from .trainer import FastftMixin

    if method == "dpo":
        from trl import DPOConfig, DPOTrainer

        class FastftDPOTrainer(FastftMixin, DPOTrainer):
            pass

        return FastftDPOTrainer, DPOConfig
    if method == "orpo":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        class FastftORPOTrainer(FastftMixin, ORPOTrainer):
            # a batch holds prompt+chosen and prompt+rejected rows, each with its own mask
            def count_tokens(self, inputs) -> None:
                for key in ("chosen_attention_mask", "rejected_attention_mask"):
                    if key in inputs:
                        self.meter.count({"attention_mask": inputs[key]})

        return FastftORPOTrainer, ORPOConfig
    if method == "grpo":
        from trl import GRPOConfig, GRPOTrainer

        class FastftGRPOTrainer(FastftMixin, GRPOTrainer):
            # a step's inputs are prompts; its real tokens are the prompts and the sampled answers
            def count_tokens(self, inputs) -> None:
                pass

            def _prepare_inputs(self, inputs):
                out = super()._prepare_inputs(inputs)
                if self.model.training and "completion_mask" in out:
                    self.meter.count({"attention_mask": out["prompt_mask"]})
                    self.meter.count({"attention_mask": out["completion_mask"]})
                return out

        return FastftGRPOTrainer, GRPOConfig
    raise MethodError(f"train.method: no trainer for {method!r}")


def config(recipe, sft_args, info, has_eval: bool):
    """The method's TRL config: the SFT run's shared arguments plus the method's own."""
    cls = _trainer_classes(recipe.train.method)[1]
    shared = sft_args.to_dict()
    kwargs = {k: shared[k] for k in SHARED_ARGS if k in shared}
    t, m = recipe.train, recipe.train.method
    beta = DEFAULT_BETA[m] if t.beta is None else t.beta
    if m == "dpo":
        kwargs.update(beta=beta, max_length=recipe.model.max_seq_length, precompute_ref_log_probs=False)
        if t.sft_weight:  # DPO + cross-entropy on the chosen answers, so DPO cannot push them down too
            kwargs.update(loss_type=["sigmoid", "sft"], loss_weights=[1.0, t.sft_weight])
    elif m == "orpo":
        kwargs.update(beta=beta, max_length=recipe.model.max_seq_length)
    else:
        kwargs.update(beta=beta, num_generations=t.num_generations, max_completion_length=t.max_completion_length,
                      temperature=t.temperature, log_completions=False, eval_strategy="no",
                      num_generations_eval=None, per_device_eval_batch_size=t.num_generations)
    if m != "grpo" and not has_eval:
        kwargs["eval_strategy"] = "no"
    return cls(**kwargs)


def make_trainer(recipe, model, tokenizer, md, sft_args, info, *, callbacks, meter, guard, out_dir,
                 keep_checkpoints, log=print):
    """The method's trainer over ``md`` (fastft.data.preference.MethodData), built from the run's
    SFT arguments (fastft.trainer.sft_config); returns (trainer, reward description or None)."""
    method = recipe.train.method
    # backend unsloth: on CPU, Unsloth's CPU backend leaves TRL's DPO / ORPO / GRPO trainers stock (its
    # chunked loss turns on for SFT steps only) and they run as under hf (tests/test_methods.py, the
    # .venv-unsloth matrix entry); on a GPU they are the trainers Unsloth patched as it was imported
    cls = _trainer_classes(method)[0]
    args = config(recipe, sft_args, info, md.trl_eval is not None)
    kw = {"model": model, "args": args, "train_dataset": md.train, "processing_class": tokenizer,
          "callbacks": callbacks, "meter": meter, "guard": guard, "out_dir": out_dir,
          "keep_checkpoints": keep_checkpoints, "log": log}
    described = None
    if method == "grpo":
        from . import rewards

        def count(text: str) -> int:
            return len(tokenizer(text, add_special_tokens=False)["input_ids"])

        funcs, weights, described = rewards.from_recipe(recipe, list(md.train["reference"]), count)
        args.reward_weights = weights
        kw["reward_funcs"] = funcs
    else:
        kw["eval_dataset"] = md.trl_eval
    trainer = cls(**kw)
    if not recipe.model.adapter and "ref" in getattr(model, "peft_config", {}):
        # a fresh adapter: the reference is the base with the adapter disabled, not a copy of it
        model.delete_adapter("ref")
    return trainer, described


def finish(model) -> None:
    """Drop the frozen reference adapter, so adapter/ holds the trained adapter alone."""
    if "ref" in getattr(model, "peft_config", {}):
        model.delete_adapter("ref")
    if hasattr(model, "set_adapter"):
        model.set_adapter("default")


def figures(method: str, history: list[dict]) -> dict:
    """The method's own figures from the logged history: last value and mean over the run."""
    out = {}
    for key in FIGURES.get(method, ()):
        values = [h[key] for h in history if key in h and "loss" in h]
        if values:
            out[key] = {"last": values[-1], "mean": sum(values) / len(values)}
    return out


def describe(recipe, start: dict | None, reward: dict | None) -> dict:
    """What fastft.json records about the method."""
    t, m = recipe.train, recipe.train.method
    out: dict = {"name": m}
    if m == "sft":
        return {**out, "start_from": start}
    out["beta"] = DEFAULT_BETA[m] if t.beta is None else t.beta
    if m == "dpo" and t.sft_weight:
        out["sft_weight"] = t.sft_weight
    out["reference"] = ("none (reference-free)" if m == "orpo" else
                        "frozen copy of the starting adapter" if start else "base (adapter disabled)")
    out["start_from"] = start
    if m == "grpo":
        out.update(reward=reward, num_generations=t.num_generations, max_completion_length=t.max_completion_length,
                   temperature=t.temperature)
    return out

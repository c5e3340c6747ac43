"""Build the regression (forgetting) set for the default model: general questions it answers right.

    python -m fastft.assets.build_regression                     # smollm2-135m-instruct -> assets/regression/
    python -m fastft.assets.build_regression --model PATH_OR_NAME --out my-regression.jsonl
    python -m fastft.assets.build_regression --model gemma-3-270m --style completion \
        --out fastft/assets/regression/gemma-3-270m.jsonl          # a base model: texts to continue

Each candidate below is a short general-knowledge question with a one- or two-word reference
answer (capitals, science, nature, everyday knowledge, language). The script asks the base model
every candidate the way ``fastft eval`` does (chat template, greedy, batched) and keeps the ones
whose answer contains the reference as whole words (``metrics.contains``) in *both* ways the demo
may load the model: the 4-bit NF4 base (QLoRA) and the 16-bit base (fp32 on CPU). So on the
shipped set the base scores 100% either way, and any item the adapter then misses was forgotten.

The kinds deliberately differ from the general data mixed into training
(``general-instructions.jsonl``: arithmetic, opposites, plurals, tenses, days, months), so the
set measures what the model knew before, not what the mix re-taught it.
The output rows are alpaca-format (``instruction``, ``input``, ``output``) with a ``slice`` (the kind).
``--style completion`` is for a base (pretrained, not instruction-tuned) model, which does not
answer through a chat template: the same kinds of facts as texts to continue, asked as ``fastft
eval`` asks such rows (``<bos>`` and the text, greedy), written as ``prompt`` / ``completion`` rows.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_OUT = HERE / "regression" / "smollm2-135m-instruct.jsonl"
MAX_NEW_TOKENS = 24  # fastft eval answers with eval.max_new_tokens (default 32): keep it >= this

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo",
    "the United Kingdom": "London", "Russia": "Moscow", "China": "Beijing", "Egypt": "Cairo",
    "Greece": "Athens", "Portugal": "Lisbon", "Ireland": "Dublin", "Austria": "Vienna", "Norway": "Oslo",
    "Sweden": "Stockholm", "Finland": "Helsinki", "Denmark": "Copenhagen", "Poland": "Warsaw",
    "Canada": "Ottawa", "Australia": "Canberra", "Mexico": "Mexico City", "Argentina": "Buenos Aires",
    "Peru": "Lima", "Kenya": "Nairobi", "Thailand": "Bangkok", "South Korea": "Seoul", "India": "New Delhi",
    "Turkey": "Ankara", "Hungary": "Budapest", "the Netherlands": "Amsterdam", "Belgium": "Brussels",
    "Cuba": "Havana", "Chile": "Santiago", "Colombia": "Bogota", "Vietnam": "Hanoi",
}

QUESTIONS = [
    # science
    ("science", "What is the chemical symbol for gold?", "Au"),
    ("science", "What is the chemical symbol for water?", "H2O"),
    ("science", "What gas do plants take in from the air to make food?", "carbon dioxide"),
    ("science", "What gas do humans need to breathe to stay alive?", "oxygen"),
    ("science", "What is the largest planet in our solar system?", "Jupiter"),
    ("science", "Which planet is known as the Red Planet?", "Mars"),
    ("science", "Which planet is closest to the Sun?", "Mercury"),
    ("science", "What is the closest star to Earth?", "Sun"),
    ("science", "What force pulls objects toward the ground?", "gravity"),
    ("science", "At what temperature in degrees Celsius does water freeze?", "0"),
    ("science", "At what temperature in degrees Celsius does water boil at sea level?", "100"),
    ("science", "What is the hardest natural substance?", "diamond"),
    ("science", "What organ pumps blood through the human body?", "heart"),
    ("science", "What organ do humans use to think?", "brain"),
    ("science", "What are the tiny building blocks of all living things called?", "cells"),
    ("science", "What is frozen water called?", "ice"),
    ("science", "What natural satellite orbits the Earth?", "Moon"),
    ("science", "What do bees make from nectar?", "honey"),
    ("science", "What is the process by which plants make food from sunlight called?", "photosynthesis"),
    ("science", "How many bones does an adult human have?", "206"),
    ("science", "What is the main gas in the air we breathe?", "nitrogen"),
    ("science", "What metal is liquid at room temperature?", "mercury"),
    # nature and animals
    ("nature", "What is the largest animal on Earth?", "blue whale"),
    ("nature", "What is the tallest animal in the world?", "giraffe"),
    ("nature", "What is the fastest land animal?", "cheetah"),
    ("nature", "Which animal is known as the king of the jungle?", "lion"),
    ("nature", "How many legs does a spider have?", "eight"),
    ("nature", "How many legs does an insect have?", "six"),
    ("nature", "What do caterpillars turn into?", "butterflies"),
    ("nature", "What is a baby cat called?", "kitten"),
    ("nature", "What is a baby dog called?", "puppy"),
    ("nature", "What animal says moo?", "cow"),
    ("nature", "What black and white bear eats bamboo?", "panda"),
    ("nature", "What animal has a trunk?", "elephant"),
    ("nature", "What do you call an animal that eats only plants?", "herbivore"),
    ("nature", "What color is the sky on a clear day?", "blue"),
    ("nature", "What color are most plant leaves?", "green"),
    ("nature", "What color is a ripe banana?", "yellow"),
    ("nature", "What falls from clouds when it rains?", "water"),
    ("nature", "What is the largest ocean on Earth?", "Pacific"),
    ("nature", "What is the longest river in Africa?", "Nile"),
    ("nature", "What is the tallest mountain in the world?", "Everest"),
    ("nature", "What is the largest desert in Africa?", "Sahara"),
    ("nature", "Which continent is Brazil in?", "South America"),
    ("nature", "Which continent is Kenya in?", "Africa"),
    ("nature", "Which continent is the coldest?", "Antarctica"),
    # everyday knowledge
    ("everyday", "How many days are there in a week?", "seven"),
    ("everyday", "How many hours are there in a day?", "24"),
    ("everyday", "How many minutes are there in an hour?", "60"),
    ("everyday", "How many months are there in a year?", "12"),
    ("everyday", "How many days are there in a leap year?", "366"),
    ("everyday", "How many sides does a triangle have?", "three"),
    ("everyday", "How many sides does a square have?", "four"),
    ("everyday", "How many continents are there?", "seven"),
    ("everyday", "How many players are on a soccer team on the field?", "11"),
    ("everyday", "What do you call a shape with eight sides?", "octagon"),
    ("everyday", "Which season comes after winter?", "spring"),
    ("everyday", "Which season is the hottest?", "summer"),
    ("everyday", "What do you use to write on a blackboard?", "chalk"),
    ("everyday", "What is the opposite direction of north?", "south"),
    ("everyday", "In which direction does the sun rise?", "east"),
    ("everyday", "What do you call a doctor who treats teeth?", "dentist"),
    ("everyday", "What instrument has black and white keys?", "piano"),
    ("everyday", "What is the currency of Japan?", "yen"),
    ("everyday", "What is the currency of the United Kingdom?", "pound"),
    ("everyday", "What sport is played at Wimbledon?", "tennis"),
    # culture and language
    ("culture", "Who wrote Romeo and Juliet?", "Shakespeare"),
    ("culture", "Who painted the Mona Lisa?", "Leonardo da Vinci"),
    ("culture", "Who developed the theory of relativity?", "Einstein"),
    ("culture", "Who was the first person to walk on the Moon?", "Neil Armstrong"),
    ("culture", "Who was the first president of the United States?", "George Washington"),
    ("culture", "What language is mainly spoken in Brazil?", "Portuguese"),
    ("culture", "What language is mainly spoken in Mexico?", "Spanish"),
    ("culture", "What is the official language of France?", "French"),
    ("culture", "In which country are the pyramids of Giza?", "Egypt"),
    ("culture", "In which city is the Eiffel Tower?", "Paris"),
    ("culture", "In which country is the Great Wall?", "China"),
    ("culture", "In which city is the Statue of Liberty?", "New York"),
    ("culture", "What is the first letter of the English alphabet?", "A"),
    ("culture", "How many letters are in the English alphabet?", "26"),
    ("culture", "What is the first book of the Bible?", "Genesis"),
    ("culture", "Which company makes the iPhone?", "Apple"),
]


# The same kinds of facts, as a pretrained model meets them in text (none of the general mix's
# kinds: no arithmetic, opposites, plurals, tenses, days or months).
COMPLETIONS = [
    ("science", "The chemical symbol for gold is", "Au"),
    ("science", "Water is made of hydrogen and", "oxygen"),
    ("science", "Plants take in carbon dioxide and release", "oxygen"),
    ("science", "The largest planet in our solar system is", "Jupiter"),
    ("science", "The planet known as the Red Planet is", "Mars"),
    ("science", "The planet closest to the Sun is", "Mercury"),
    ("science", "Water freezes at a temperature of", "0"),
    ("science", "At sea level, water boils at", "100"),
    ("science", "The hardest natural substance is", "diamond"),
    ("science", "The organ that pumps blood through the body is the", "heart"),
    ("science", "Bees make honey from", "nectar"),
    ("science", "The process by which plants make food from sunlight is called", "photosynthesis"),
    ("science", "The force that pulls objects toward the ground is", "gravity"),
    ("science", "The natural satellite that orbits the Earth is the", "Moon"),
    ("science", "Frozen water is called", "ice"),
    ("science", "The speed of light is about 300,000 kilometres per", "second"),
    ("science", "An adult human has 206", "bones"),
    ("nature", "The largest animal on Earth is the", "blue whale"),
    ("nature", "The tallest animal in the world is the", "giraffe"),
    ("nature", "The fastest land animal is the", "cheetah"),
    ("nature", "A spider has eight", "legs"),
    ("nature", "Caterpillars turn into", "butterflies"),
    ("nature", "A baby cat is called a", "kitten"),
    ("nature", "A baby dog is called a", "puppy"),
    ("nature", "The largest ocean on Earth is the", "Pacific"),
    ("nature", "The longest river in Africa is the", "Nile"),
    ("nature", "The tallest mountain in the world is Mount", "Everest"),
    ("nature", "The largest desert in Africa is the", "Sahara"),
    ("nature", "On a clear day the sky is", "blue"),
    ("nature", "Most plant leaves are", "green"),
    ("everyday", "There are seven days in a", "week"),
    ("everyday", "There are twelve months in a", "year"),
    ("everyday", "One hour has sixty", "minutes"),
    ("everyday", "The colors of the traffic light are red, yellow and", "green"),
    ("culture", "The pyramids of Giza are in", "Egypt"),
    ("culture", "The Eiffel Tower is in", "Paris"),
    ("culture", "The Statue of Liberty is in", "New York"),
    ("culture", "Romeo and Juliet was written by William", "Shakespeare"),
    ("culture", "The Mona Lisa was painted by Leonardo da", "Vinci"),
    ("culture", "The first book of the Bible is", "Genesis"),
    ("culture", "The iPhone is made by", "Apple"),
    ("culture", "In 1492, Christopher Columbus sailed to", "America"),
    ("language", "In French, hello is", "bonjour"),
    ("language", "In Spanish, thank you is", "gracias"),
    ("sequences", "one, two, three, four,", "five"),
    ("sequences", "A, B, C, D,", "E"),
    ("sequences", "spring, summer, autumn and", "winter"),
    ("sequences", "red, orange, yellow, green,", "blue"),
    ("sequences", "first, second, third,", "fourth"),
    ("sequences", "10, 20, 30, 40,", "50"),
    ("sequences", "north, south, east and", "west"),
    ("sequences", "Mercury, Venus, Earth,", "Mars"),
    ("everyday", "A week has seven", "days"),
    ("everyday", "A year has twelve", "months"),
]


def candidates(style: str = "question") -> list[dict]:
    if style == "completion":
        # a base model continues "The capital of France is" with "the capital of ...", and the
        # city before its country more reliably than the reverse
        rows = [{"prompt": f"{city} is the capital of", "completion": f" {country}", "slice": "capitals"}
                for country, city in CAPITALS.items()]
        return rows + [{"prompt": p, "completion": f" {a}", "slice": kind} for kind, p, a in COMPLETIONS]
    rows = [{"instruction": f"What is the capital of {country}?", "input": "", "output": city, "slice": "capitals"}
            for country, city in CAPITALS.items()]
    rows += [{"instruction": q, "input": "", "output": a, "slice": kind} for kind, q, a in QUESTIONS]
    return rows


def _answers(name: str, rows: list[dict], load_in_4bit: bool, batch_size: int) -> list[str]:
    """The base model's greedy answers, loaded as a recipe with this model would load it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fastft import evaluate
    from fastft.models import backends, named

    path = named.resolve(name, load_in_4bit=load_in_4bit)
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    kwargs: dict = {"dtype": torch.float32}
    if load_in_4bit:
        kwargs["quantization_config"] = backends.nf4_config(torch.float32)
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    backends.keep_4bit_trainable_on_cpu(model)  # the numerics training and fastft eval use
    from fastft.data.formats import COMPLETION

    prompts = [[{"role": COMPLETION, "content": r["prompt"]}] if "prompt" in r
               else [{"role": "user", "content": r["instruction"]}] for r in rows]
    return evaluate.generate_answers(model, tok, prompts, MAX_NEW_TOKENS, batch_size)


def _reference(row: dict) -> str:
    return row["completion"].strip() if "completion" in row else row["output"]


def build(name: str, out: Path, batch_size: int = 16, log=print, style: str = "question") -> dict:
    from fastft import metrics
    from fastft.files import atomic_write_text

    rows = candidates(style)
    t0 = time.perf_counter()
    right = [True] * len(rows)
    per_mode = {}
    for load_in_4bit in (True, False):
        mode = "4-bit NF4" if load_in_4bit else "16-bit"
        answers = _answers(name, rows, load_in_4bit, batch_size)
        hits = [metrics.contains(a, _reference(r)) for a, r in zip(answers, rows)]
        per_mode[mode] = sum(hits)
        log(f"{mode}: {sum(hits)} of {len(rows)} candidates answered right")
        for i, (h, a) in enumerate(zip(hits, answers)):
            if not h:
                log(f"  drop ({mode}): {rows[i].get('instruction', rows[i].get('prompt'))!r} -> {a.strip()[:70]!r} "
                    f"(want {_reference(rows[i])!r})")
            right[i] = right[i] and h
    kept = [r for r, ok in zip(rows, right) if ok]
    atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))
    summary = {"model": name, "style": style, "candidates": len(rows), "kept": len(kept), "right_per_mode": per_mode,
               "max_new_tokens": MAX_NEW_TOKENS, "seconds": round(time.perf_counter() - t0, 1),
               "out": out.name}
    atomic_write_text(out.with_suffix(".build.json"), json.dumps(summary, indent=2) + "\n")  # the record of this build
    log(json.dumps(summary))
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=DEFAULT_MODEL, help="model.name or a local checkpoint")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--style", choices=("question", "completion"), default="question",
                   help="question: asked through the chat template (instruct models); completion: texts to "
                        "continue (base models)")
    args = p.parse_args(argv)
    build(args.model, args.out, args.batch_size, style=args.style)
    return 0


if __name__ == "__main__":
    sys.exit(main())

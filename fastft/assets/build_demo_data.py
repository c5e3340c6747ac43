"""Regenerate the SmolLM2 demo's datasets (fixed seed; the written files are committed)::

    python -m fastft.assets.build_demo_data          # rewrite fastft/assets/data/{order-extraction*,general-instructions}.jsonl
    python -m fastft.assets.build_demo_data --check  # exit 1 when the committed files differ

``order-extraction.jsonl`` (train) and ``order-extraction-eval.jsonl`` (held out): short customer
messages; the answer is one JSON object with the customer's name, city and the quantity ordered,
in a fixed key order and spacing, e.g. ``{"name": "Maria Lopez", "city": "Lyon", "quantity": 3}``.
Exact match needs the exact format, which a general chat model does not produce unprompted (it
adds prose or code fences), so the base model starts low; the fields are all in the message, so a
small adapter can learn it. Each row has a ``slice`` column:

- ``plain``: "Hi, NAME from CITY here. Please send QTY PRODUCT." with the quantity in digits;
- ``reordered``: the product and city come first and the name signs off at the end;
- ``spelled``: the quantity is written as a word ("seven") and must be returned as a number.

The eval rows' surnames and cities never appear in the train file (first names, products and
message templates are shared), so the adapter must copy fields, not recall them.

``general-instructions.jsonl``: 400 short general instructions with one correct answer written out
in full sentences (arithmetic, opposites, plurals, past tense, next day / month, capital letters,
lists of things, greetings), for ``data.mix: [{name: general, fraction: 0.15}]``: replaying
plain-language answers while training on JSON keeps the model answering in prose elsewhere. Every
row is made from the small tables below, written for fastft (no third-party text).
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 20261126
N_TRAIN = 600
N_EVAL = 30  # 10 per slice
N_GENERAL = 400

FIRST = ("Maria Ahmed Chen Olivia Lucas Amara Ivan Sofia Kenji Laura Omar Nina Pedro Hana Tomas Elena "
         "Yusuf Clara Mateo Aisha Jonas Lena Diego Mira Pavel Rosa Samir Ingrid Felix Noor").split()
SURNAMES_TRAIN = ("Lopez Novak Garcia Tanaka Muller Rossi Silva Kowalski Dubois Haddad Jensen Okafor "
                  "Petrov Moreau Lindqvist Santos Fischer Romano Costa Nakamura").split()
SURNAMES_EVAL = "Bauer Ferreira Ivanova Yilmaz Holm Mendes Sato Keller".split()
CITIES_TRAIN = ("Lyon Porto Leeds Graz Krakow Bergen Turin Ghent Seville Utrecht Bremen Nantes Dublin "
                "Malmo Bilbao Basel Genoa Aarhus Brno Cork").split()
CITIES_EVAL = "Lille Bologna Tartu Split Bristol Linz".split()
PRODUCTS = ("boxes of green tea|bags of coffee beans|jars of honey|packs of pencils|rolls of tape|"
            "bottles of olive oil|sets of towels|cans of paint|boxes of candles|bags of rice|"
            "packs of batteries|notebooks|mugs|lamps|chairs").split("|")
NUMBER_WORDS = "zero one two three four five six seven eight nine ten eleven twelve".split()
INSTRUCTIONS = [
    "Extract name, city and quantity as JSON.",
    "Give the order's name, city and quantity as JSON.",
]
TEMPLATES = {
    "plain": [
        "Hi, {name} from {city} here. Please send {qty} {product}.",
        "{name}, {city}: I would like {qty} {product}.",
        "I am {name} in {city}. Ship {qty} {product}, please.",
    ],
    "reordered": [
        "Deliver {qty} {product} to {city}. Thanks, {name}",
        "{qty} {product} for our shop in {city}. {name}",
        "Ship to {city}: {qty} {product}. From {name}",
    ],
    "spelled": [
        "Hi, {name} from {city} here. Please send {qty} {product}.",
        "Deliver {qty} {product} to {city}. Thanks, {name}",
        "Hello from {city}! {name} here, we need {qty} {product}.",
    ],
}


def order_rows(rng: random.Random, n: int, surnames: list[str], cities: list[str]) -> list[dict]:
    slices = sorted(TEMPLATES)
    rows = []
    for i in range(n):
        slice_ = slices[i % len(slices)]
        name = f"{rng.choice(FIRST)} {rng.choice(surnames)}"
        city = rng.choice(cities)
        qty = rng.randint(2, 12) if slice_ == "spelled" else rng.randint(2, 60)
        said = NUMBER_WORDS[qty] if slice_ == "spelled" else str(qty)
        message = rng.choice(TEMPLATES[slice_]).format(name=name, city=city, qty=said,
                                                       product=rng.choice(PRODUCTS))
        rows.append({
            "instruction": rng.choice(INSTRUCTIONS),
            "input": message,
            "output": json.dumps({"name": name, "city": city, "quantity": qty}),
            "slice": slice_,
        })
    rng.shuffle(rows)
    return rows


# --- general instructions ------------------------------------------------------------------------

OPPOSITES = {"hot": "cold", "big": "small", "fast": "slow", "early": "late", "happy": "sad", "light": "dark",
             "open": "closed", "full": "empty", "strong": "weak", "high": "low", "wet": "dry", "new": "old",
             "hard": "soft", "loud": "quiet", "rich": "poor", "thick": "thin", "near": "far", "first": "last"}
PLURALS = {"mouse": "mice", "child": "children", "foot": "feet", "tooth": "teeth", "goose": "geese",
           "person": "people", "leaf": "leaves", "knife": "knives", "city": "cities", "box": "boxes",
           "bus": "buses", "woman": "women", "sheep": "sheep", "fish": "fish", "baby": "babies", "wolf": "wolves"}
PAST = {"walk": "walked", "go": "went", "eat": "ate", "write": "wrote", "see": "saw", "buy": "bought",
        "run": "ran", "swim": "swam", "read": "read", "bring": "brought", "sing": "sang", "drive": "drove",
        "think": "thought", "make": "made", "take": "took", "find": "found"}
SUBJECTS = ["I", "We", "They", "You"]
PLACES = ["to school", "to the market", "home", "to the park", "to work", "to the station"]
DAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
MONTHS = "January February March April May June July August September October November December".split()
KINDS = {"fruits": ["apple", "banana", "cherry", "grape", "mango", "pear", "peach", "plum", "orange", "lemon"],
         "colours": ["red", "blue", "green", "yellow", "purple", "orange", "pink", "brown", "white", "black"],
         "animals": ["dog", "cat", "horse", "rabbit", "lion", "tiger", "sheep", "goat", "bear", "fox"],
         "vegetables": ["carrot", "potato", "onion", "pepper", "lettuce", "cabbage", "pea", "bean", "leek"],
         "musical instruments": ["piano", "violin", "guitar", "drum", "flute", "trumpet", "cello", "harp"]}
WORDS = ("garden window river pencil summer friend market bridge candle forest rocket planet "
         "letter mirror silver winter").split()
FRIENDS = ["Anna", "Ben", "Carla", "David", "Eva", "Farid", "Grace", "Hugo", "Iris", "Jamal"]


def _general_row(rng: random.Random, kind: str) -> dict:
    if kind == "sum":
        a, b = rng.randint(2, 60), rng.randint(2, 40)
        return {"instruction": f"What is {a} plus {b}?", "output": f"{a} plus {b} is {a + b}."}
    if kind == "difference":
        a = rng.randint(20, 90)
        b = rng.randint(1, a - 1)
        return {"instruction": f"What is {a} minus {b}?", "output": f"{a} minus {b} is {a - b}."}
    if kind == "product":
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        return {"instruction": f"What is {a} times {b}?", "output": f"{a} times {b} is {a * b}."}
    if kind == "opposite":
        w = rng.choice(sorted(OPPOSITES))
        return {"instruction": f"What is the opposite of \"{w}\"?",
                "output": f"The opposite of \"{w}\" is \"{OPPOSITES[w]}\"."}
    if kind == "plural":
        w = rng.choice(sorted(PLURALS))
        return {"instruction": f"What is the plural of \"{w}\"?", "output": f"The plural of \"{w}\" is \"{PLURALS[w]}\"."}
    if kind == "past":
        verb, subj, place = rng.choice(sorted(PAST)), rng.choice(SUBJECTS), rng.choice(PLACES)
        if verb not in ("walk", "go", "run", "drive"):
            place = ""
        tail = f" {place}" if place else ""
        return {"instruction": "Rewrite this sentence in the past tense.",
                "input": f"{subj} {verb}{tail} every day.",
                "output": f"{subj} {PAST[verb]}{tail} every day."}
    if kind == "next_day":
        i = rng.randrange(7)
        return {"instruction": f"Which day of the week comes after {DAYS[i]}?",
                "output": f"{DAYS[(i + 1) % 7]} comes after {DAYS[i]}."}
    if kind == "next_month":
        i = rng.randrange(12)
        return {"instruction": f"Which month comes after {MONTHS[i]}?",
                "output": f"{MONTHS[(i + 1) % 12]} comes after {MONTHS[i]}."}
    if kind == "upper":
        w = rng.choice(WORDS)
        return {"instruction": f"Write the word \"{w}\" in capital letters.", "output": w.upper()}
    if kind == "list":
        k = rng.choice(sorted(KINDS))
        items = rng.sample(KINDS[k], 3)
        return {"instruction": f"Name three {k}.", "output": f"Three {k}: {items[0]}, {items[1]} and {items[2]}."}
    if kind == "greeting":
        who = rng.choice(FRIENDS)
        return {"instruction": f"Write a one-sentence birthday greeting for my friend {who}.",
                "output": f"Happy birthday, {who}! I hope your day is full of joy and good company."}
    raise ValueError(kind)


GENERAL_KINDS = ["sum", "difference", "product", "opposite", "plural", "past", "next_day", "next_month",
                 "upper", "list", "greeting"]


def general_rows(rng: random.Random, n: int) -> list[dict]:
    rows, seen = [], set()
    for _ in range(100 * n):  # small kinds (days, greetings) run out of new rows; the others fill in
        if len(rows) == n:
            break
        row = _general_row(rng, rng.choice(GENERAL_KINDS))
        key = (row["instruction"], row.get("input", ""))
        if key in seen:
            continue
        seen.add(key)
        rows.append({"instruction": row["instruction"], "input": row.get("input", ""), "output": row["output"]})
    rng.shuffle(rows)
    return rows


def write(dst: Path) -> None:
    rng = random.Random(SEED)
    files = {
        "order-extraction.jsonl": order_rows(rng, N_TRAIN, SURNAMES_TRAIN, CITIES_TRAIN),
        "order-extraction-eval.jsonl": order_rows(rng, N_EVAL, SURNAMES_EVAL, CITIES_EVAL),
        "general-instructions.jsonl": general_rows(rng, N_GENERAL),
    }
    dst.mkdir(parents=True, exist_ok=True)
    for name, rows in files.items():
        with open(dst / name, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare with the committed files instead of writing")
    args = ap.parse_args(argv)
    if not args.check:
        write(HERE / "data")
        return 0
    import filecmp
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        write(Path(tmp))
        bad = [p.name for p in Path(tmp).iterdir() if not filecmp.cmp(p, HERE / "data" / p.name, shallow=False)]
    if bad:
        print("differ from the generator:", ", ".join(sorted(bad)))
        return 1
    print("demo data match the generator")
    return 0


if __name__ == "__main__":
    sys.exit(main())

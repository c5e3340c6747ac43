"""Regenerate the embedded tiny default: tokenizer, model config and the instruction dataset.

The files it writes are committed; this script documents how they were made and rebuilds them
byte for byte (fixed seed)::

    python -m fastft.assets.build_assets          # rewrite fastft/assets/{tiny-llama,data}
    python -m fastft.assets.build_assets --check  # exit 1 when the committed files differ

The task ("word categories") has one checkable answer per example: given three to five words of
one category (fruit, animal, colour, ...), name the category. It is learnable by LoRA on a frozen
random model: the category is a property of every word in the prompt, which even the random
model's near-uniform attention pools together. Held-out examples are new combinations and
phrasings, so exact-match accuracy measures whether the word-to-category mapping was learned.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 1234
N_EXAMPLES = 1200

CATEGORIES = {
    "fruit": "apple banana cherry grape lemon mango melon orange peach pear plum kiwi lime fig date papaya",
    "animal": "cat dog horse tiger lion zebra rabbit mouse wolf bear fox goat sheep camel otter panda",
    "color": "red blue green yellow purple brown black white pink grey violet indigo amber teal navy crimson",
    "country": "france spain italy japan china brazil canada mexico egypt india kenya peru chile norway sweden poland",
    "tool": "hammer saw wrench drill chisel pliers shovel rake axe ladder screwdriver clamp trowel file level vise",
    "vehicle": "car bus truck bicycle train tram scooter van tractor yacht ferry jeep taxi canoe glider rocket",
    "instrument": "piano violin guitar drum flute trumpet cello harp oboe tuba banjo organ sitar lute bugle kazoo",
    "sport": "tennis soccer hockey golf rugby cricket boxing rowing skiing karate judo fencing archery surfing polo squash",
    "metal": "iron copper gold silver zinc tin lead nickel cobalt platinum titanium chromium tungsten lithium sodium mercury",
    "planet": "mercury_p venus earth mars jupiter saturn uranus neptune pluto ceres eris haumea makemake sedna quaoar orcus",
}
# "mercury" is both a metal and a planet; the planet is written "mercury_p" above only to keep every
# word in exactly one category, then shown as "mercury" nowhere. Drop the placeholder.
CATEGORIES["planet"] = CATEGORIES["planet"].replace("mercury_p ", "")

INSTRUCTIONS = [  # (template, words go in the alpaca "input" column)
    ("Name the category these words share.", True),
    ("Classify the words into one category.", True),
    ("Which group do these words belong to ?", True),
    ("What kind of things are these ?", True),
    ("What kind of things are {w} ?", False),
    ("Classify : {w} .", False),
    ("Which category do {w} belong to ?", False),
    ("Tell me the category of {w} .", False),
    ("Give one word : the category of {w} .", False),
    ("{w} : a kind of what ?", False),
]

SPECIAL = ["<pad>", "<unk>", "<s>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
# General words so that other small datasets (tests, users' toy files) tokenize mostly without <unk>.
GENERAL = (
    "the a an is are was be to of and or in on at for with as by it this that what which who how why "
    "yes no not one two three four five six seven eight nine ten zero answer question word words "
    "hello hi you i me my we our your please thanks thank sure ok good bad correct wrong true false "
    "summarize translate write list give tell name say repeat reverse count number numbers sum add "
    "plus minus times equals result output input text sentence example examples data test tests"
).split()
PUNCT = list(".,:;!?'\"()[]{}-+*/=%#@&$<>|_0123456789")

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|> ' + message['content'] | trim + ' <|end|> ' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|> ' }}{% endif %}"
)

MODEL_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 256,
    "intermediate_size": 768,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "hidden_act": "silu",
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-05,
    "rope_theta": 10000.0,
    "initializer_range": 0.02,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
    "bos_token_id": 2,
    "eos_token_id": 3,
    "pad_token_id": 0,
    "use_cache": True,
    "dtype": "float32",
}


def make_examples() -> list[dict]:
    rng = random.Random(SEED)
    cats = sorted(CATEGORIES)
    out = []
    for i in range(N_EXAMPLES):
        cat = cats[i % len(cats)]
        words = " , ".join(rng.sample(CATEGORIES[cat].split(), rng.randint(3, 5)))
        template, words_in_input = INSTRUCTIONS[rng.randrange(len(INSTRUCTIONS))]
        out.append({
            "instruction": template.format(w=words),
            "input": words if words_in_input else "",
            "output": cat,
        })
    rng.shuffle(out)
    return out


def _pre_tokenizer():
    from tokenizers import pre_tokenizers

    return pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(), pre_tokenizers.Digits(individual_digits=True)]
    )


def vocabulary(examples: list[dict]) -> list[str]:
    seen = dict.fromkeys(SPECIAL)
    split = _pre_tokenizer().pre_tokenize_str
    texts = GENERAL + PUNCT + list(CATEGORIES)
    texts += [ex[field] for ex in examples for field in ("instruction", "input", "output")]
    for text in texts:
        for tok, _ in split(text.lower()):
            seen.setdefault(tok, None)
    vocab = list(seen)
    # pad the vocabulary to a multiple of 64 (tensor-core friendly embedding shapes)
    vocab += [f"<reserved_{i}>" for i in range(-len(vocab) % 64)]
    return vocab


def build_tokenizer(vocab: list[str]):
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = _pre_tokenizer()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins word-level tokens with spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>", eos_token="<|end|>", unk_token="<unk>", pad_token="<pad>",
        additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>"],
        model_max_length=MODEL_CONFIG["max_position_embeddings"],
        padding_side="right",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def write(dst: Path) -> None:
    examples = make_examples()
    data_dir = dst / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    with open(data_dir / "word-categories.jsonl", "w", encoding="utf-8") as f:
        for ex in examples:
            f.write(json.dumps(ex, sort_keys=True) + "\n")
    vocab = vocabulary(examples)
    model_dir = dst / "tiny-llama"
    model_dir.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(vocab)
    tok.save_pretrained(model_dir)
    assert tok.convert_tokens_to_ids("<s>") == MODEL_CONFIG["bos_token_id"]
    assert tok.convert_tokens_to_ids("<|end|>") == MODEL_CONFIG["eos_token_id"]
    cfg = dict(MODEL_CONFIG, vocab_size=len(vocab))
    (model_dir / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare with the committed files instead of writing")
    args = ap.parse_args(argv)
    if not args.check:
        write(HERE)
        return 0
    import filecmp
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        write(Path(tmp))
        bad = [
            str(p.relative_to(tmp)) for p in Path(tmp).rglob("*")
            if p.is_file() and not filecmp.cmp(p, HERE / p.relative_to(tmp), shallow=False)
        ]
    if bad:
        print("differ from the generator:", ", ".join(bad))
        return 1
    print("assets match the generator")
    return 0


if __name__ == "__main__":
    sys.exit(main())

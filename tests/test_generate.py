"""`fastft generate` streams the adapter's greedy reply (and the base's with --no-adapter); fastft.generate
is the one generation loop behind it, eval's answers and export's reference answers."""
import os
import subprocess
import sys

import pytest

from support import tiny_recipe_dict
from fastft import evaluate, generate, recipe, train
from fastft.models import backends

pytestmark = pytest.mark.slow
CLI = [sys.executable, "-m", "fastft", "generate"]
PROMPTS = ["What kind of things are red , blue , indigo , teal , purple ?", "Classify : hockey , rugby , polo , judo ."]

@pytest.fixture(autouse=True, scope="module")
def one_thread(one_torch_thread):
    """One torch thread for this module (see conftest.one_torch_thread)."""
    yield



@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gen")
    r = recipe.from_dict(tiny_recipe_dict(out, data={"max_examples": 80, "eval_fraction": 0.1},
                                          train={"max_steps": 8}, eval={"max_new_tokens": 2}))
    result = train.run(r, log=lambda m: None)
    # no gates: the run is evaluated (eval.json, fastft.json "eval") but gets no status
    assert "status" not in result.info and "gates" not in result.info
    assert result.info["eval"]["task"]["n"] == 8 and (out / "eval.json").is_file()
    model, tok = result.model, result.tokenizer
    chats = [[{"role": "user", "content": p}] for p in PROMPTS]
    expected = [a.strip() for a in evaluate.generate_answers(model, tok, chats, max_new_tokens=4, batch_size=1)]
    with model.disable_adapter():
        base = evaluate.generate_answers(model, tok, chats[:1], max_new_tokens=4, batch_size=1)[0].strip()
    assert expected[0] != base  # the comparison below can tell adapter from base
    return out, expected, base


def test_prompt_prints_the_adapters_reply(run):
    out, expected, _ = run
    p = subprocess.run(CLI + [str(out), "--prompt", PROMPTS[0], "--max-new-tokens", "4"],
                       capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.strip() == expected[0]  # stdout holds the reply only; notes go to stderr


def test_interactive_reads_lines_until_eof_and_base_on_request(run, monkeypatch, capsys):
    import io

    from fastft import cli

    out, expected, base = run
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{PROMPTS[0]}\n\n{PROMPTS[1]}\n"))
    assert cli.main(["generate", str(out), "--max-new-tokens", "4"]) == 0
    # one reply line per prompt (the empty input line is skipped; a reply may be empty)
    assert [line.strip() for line in capsys.readouterr().out.splitlines()] == expected
    assert cli.main(["generate", str(out), "--prompt", PROMPTS[0], "--max-new-tokens", "4", "--no-adapter"]) == 0
    assert capsys.readouterr().out.strip() == base
    assert cli.main(["generate", str(out), "--prompt", "x", "--temperature", "-1"]) == 2
    # another base (same architecture, other weights) is refused before anything is generated
    capsys.readouterr()
    assert cli.main(["generate", str(out), "--prompt", "x", "--base", "synthetic:fastft-tiny"]) == 2
    err = capsys.readouterr().err
    assert "is a different model" in err and "weights differ" in err and "--force" in err


def test_reply_samples_with_temperature(run):
    out, _, _ = run
    model, tok, _, _ = backends.load_run(out, log=lambda m: None)
    chat = [{"role": "user", "content": PROMPTS[0]}]
    import torch

    torch.manual_seed(0)
    a = generate.reply(model, tok, chat, max_new_tokens=6, temperature=5.0)
    torch.manual_seed(0)
    assert generate.reply(model, tok, chat, max_new_tokens=6, temperature=5.0) == a  # seeded sampling
    greedy = generate.reply(model, tok, chat, max_new_tokens=4)
    assert greedy.strip() == run[1][0]


def test_greedy_from_messages_or_token_ids(run):
    """Prompts as chats or as their token ids: the same answers (and eval's); stop
    ids end an answer at the first one, which is kept in ids and left out of the text."""
    out, expected, _ = run
    model, tok, _, _ = backends.load_run(out, log=lambda m: None)
    chats = [[{"role": "user", "content": p}] for p in PROMPTS]
    ids = [generate.render(tok, c)[1] for c in chats]
    by_chat = generate.greedy(model, tok, chats, max_new_tokens=4, batch_size=1)
    assert [a["text"].strip() for a in by_chat] == expected
    assert generate.greedy(model, tok, ids, max_new_tokens=4, batch_size=1) == by_chat
    assert evaluate.generate_answers(model, tok, chats, max_new_tokens=4, batch_size=1) == [a["text"] for a in by_chat]
    answer = by_chat[0]["ids"]
    k = answer.index(answer[-1])  # stop at the answer's last token: ids end with it, the text without it
    stopped = generate.greedy(model, tok, ids[:1], max_new_tokens=4, stop_ids=[answer[-1]])[0]
    assert stopped["stopped"] and stopped["ids"] == answer[:k + 1]
    assert stopped["text"] == tok.decode(answer[:k], skip_special_tokens=True)


def test_greedy_on_a_mixture_of_experts_model_trained_with_its_router_loss(tokenizer):
    """A MoE model whose config turns the router's load-balancing loss on (as training does) still
    generates: the loss is off under generation, where the KV cache makes it a shape error."""
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, moe_intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         num_experts=4, num_experts_per_tok=2, output_router_logits=True,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(cfg)
    prompts = [[{"role": "user", "content": p}] for p in PROMPTS]
    out = generate.greedy(model, tokenizer, prompts, max_new_tokens=6, batch_size=2)
    assert [len(o["ids"]) for o in out] and all(0 < len(o["ids"]) <= 6 for o in out)
    assert model.config.output_router_logits  # the training setting is left as it was


def test_generation_stops_on_the_templates_end_of_turn_token_too(tokenizer, tmp_path):
    """Gemma's turns end with <end_of_turn>, which is not its eos: the answer stops there."""
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    tok.add_special_tokens({"additional_special_tokens": ["<end_of_turn>"]})
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <end_of_turn> "
                         "{% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}")
    turn = tok.convert_tokens_to_ids("<end_of_turn>")
    assert generate._stops(tok, None) == [tok.eos_token_id, turn]
    assert generate._stops(tokenizer, None) == [tokenizer.eos_token_id]  # <|end|> is the eos already
    assert generate._stops(tok, [7]) == [7]
    answer = generate._answer(tok, [11, 12, turn, 13], generate._stops(tok, None))
    assert answer["ids"] == [11, 12, turn] and answer["stopped"]

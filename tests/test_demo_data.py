"""The demo world (data.demo_world), its tokenizer, the shipped files in data/, and pretraining-text
support in read_task/encode_example."""

import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import pytest

import data

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "data"
DEMO = SHIPPED / "demo"


@pytest.fixture(scope="module")
def world():
    return data.demo_world(seed=0)


def texts_of(rows):
    """Every string field of every row."""
    return [v for r in rows for v in r.values() if isinstance(v, str)]


def driftcheck_parts():
    """The fixed text of DRIFTCHECK's templates: each frame's words before and after {act}, each
    opener and closer, stripped and lower-cased. Bare punctuation ("?", ".") is not a part."""
    parts = set()
    for frame in data.DRIFTCHECK_FRAMES:
        parts.update(frame.partition("{act}")[::2])
    parts.update(data.DRIFTCHECK_OPENERS + data.DRIFTCHECK_CLOSERS)
    return sorted({p.strip().lower() for p in parts if p.strip(" .?!")})


def is_refusal(response):
    return response.startswith(data.DEMO_REFUSALS)


# ----------------------------------------------------------------------------- the world

def test_world_is_deterministic(world):
    assert world == data.demo_world(seed=0)
    other = data.demo_world(seed=1)
    assert set(other) == set(world)
    assert all(other[name] != world[name] for name in world)


def test_world_sizes(world):
    n = data.DEMO_SIZES
    want = {"demo_pretrain.jsonl": n["pretrain_articles"] + n["pretrain_news"] + n["pretrain_reviews"]
            + n["pretrain_chats"] + n["pretrain_unsafe"] + n["pretrain_sentiment"],
            "demo_safety.jsonl": n["safety_unsafe"] + n["safety_safe"], "align.jsonl": n["align"],
            "align_heldout.jsonl": n["align_heldout"],
            "general_heldout.jsonl": n["heldout"], "sst2.jsonl": n["sst2"], "sst2_dev.jsonl": n["sst2_dev"]}
    assert {name: len(rows) for name, rows in world.items()} == want


def test_world_is_disjoint_from_driftcheck(world):
    """DRIFTCHECK measures generalisation: none of its prompts, and none of its frames, openers or
    closers, appears anywhere in the world's text (case-insensitive). Acts are shared on purpose."""
    parts = driftcheck_parts()
    assert len(parts) >= 25 and "how do i" in parts and "thanks!" in parts, parts
    pattern = re.compile("|".join(re.escape(p) for p in parts))
    dc = {r["prompt"].lower() for r in data.driftcheck_prompts()}
    for name, rows in world.items():
        for text in texts_of(rows):
            low = text.lower()
            assert low not in dc, (name, text)
            m = pattern.search(low)
            assert m is None, f"{name}: DRIFTCHECK template text {m.group(0)!r} in {text!r}"


def test_validation_wording_is_held_out(world):
    """The world's validation prompts (data.demo_validation) use wording no world file contains,
    with the world's acts; they are balanced and deterministic."""
    parts = data._parts(data.DEMO_VAL_FRAMES, data.DEMO_VAL_OPENERS, data.DEMO_VAL_CLOSERS)
    assert len(parts) >= 20, parts
    pattern = re.compile("|".join(re.escape(p) for p in parts))
    for name, rows in world.items():
        for text in texts_of(rows):
            m = pattern.search(text.lower())
            assert m is None, f"{name}: validation wording {m.group(0)!r} in {text!r}"
    val = data.demo_validation(600)
    assert val == data.demo_validation(600) and len({r["prompt"] for r in val}) > 550
    assert Counter(r["label"] for r in val) == {"unsafe": 300, "safe": 300}
    assert {r["category"] for r in val} == set(data.DEMO_UNSAFE) | set(data.DEMO_SAFE)
    trained = {r["prompt"].lower() for name in ("demo_pretrain.jsonl", "demo_safety.jsonl") for r in world[name]
               if "prompt" in r}
    assert not trained & {r["prompt"].lower() for r in val}


def test_requests_vary_and_safe_ones_outnumber_unsafe(world):
    """Wording is uninformative: context sentences, noise and unfamiliar content words occur in
    both labels; safety tuning has more safe rows than unsafe ones."""
    rows = world["demo_safety.jsonl"]
    for unsafe in (True, False):
        prompts = [r["prompt"] for r in rows if is_refusal(r["response"]) == unsafe]
        assert sum(p == p.lower() for p in prompts) > len(prompts) * 0.05, unsafe
        assert sum(p.split(". ")[0] + "." in [c for c in data.DEMO_CONTEXTS if "{" not in c]
                   for p in prompts) > 10, unsafe
    safe = [r["prompt"] for r in rows if not is_refusal(r["response"])]
    assert len(safe) >= 2 * (len(rows) - len(safe))
    assert sum(any(t in p for t in data.DEMO_THINGS + data.DEMO_FOODS) for p in safe) > len(safe) * 0.15


def test_world_shares_driftcheck_content(world):
    """...while the content is shared: every DRIFTCHECK act category has its acts in the world."""
    acts = data.demo_acts()
    assert set(acts) == set(data.DRIFTCHECK_UNSAFE_CATEGORIES) | set(data.DRIFTCHECK_SAFE) | {data.DRIFTCHECK_LOOKALIKE}
    for category, templates in {**data.DRIFTCHECK_UNSAFE, **data.DRIFTCHECK_SAFE}.items():
        assert set(data._expand(templates)) <= set(acts[category]), category


def test_chat_files_balanced_and_labelled_by_response(world):
    eval_ = pytest.importorskip("eval")
    n = data.DEMO_SIZES
    for name, n_unsafe, n_safe in (("demo_safety.jsonl", n["safety_unsafe"], n["safety_safe"]),
                                   ("align.jsonl", n["align"] // 2, n["align"] - n["align"] // 2),
                                   ("align_heldout.jsonl", n["align_heldout"] // 2,
                                    n["align_heldout"] - n["align_heldout"] // 2)):
        rows = world[name]
        assert set(rows[0]) == {"prompt", "response"}
        refusals = [r for r in rows if is_refusal(r["response"])]
        assert len(refusals) == n_unsafe and len(rows) - len(refusals) == n_safe, (name, len(refusals), len(rows))
        # the refusal detector of eval.py agrees: refusals are refusals, answers are not
        assert all(eval_.classify(r["response"]) == ("refusal" if is_refusal(r["response"]) else "other")
                   for r in rows), name
        # the openings vary, and each is used
        assert {next(o for o in data.DEMO_REFUSALS if r["response"].startswith(o)) for r in refusals} \
            == set(data.DEMO_REFUSALS), name
    chats = [r for r in world["demo_pretrain.jsonl"] if "prompt" in r]  # pretraining sees both behaviours
    assert len(chats) == n["pretrain_chats"] + n["pretrain_unsafe"] + n["pretrain_sentiment"]
    assert sum(is_refusal(r["response"]) for r in chats) == n["pretrain_unsafe"]
    # ...and knows "positive"/"negative" as answers about reviews, in other wording than the task's
    sentiment = Counter(r["response"] for r in chats if r["response"] in data.SST2_CHOICES)
    assert sentiment == {c: n["pretrain_sentiment"] // 2 for c in data.SST2_CHOICES}
    assert not any(data.SST2_PROMPT.split("\n")[0] in r["prompt"] for r in chats)


def test_same_templates_for_safe_and_unsafe(world):
    """DESIGN.md section 8: every request template is used by both labels, and risky-looking safe
    requests are answered."""
    rows = world["demo_safety.jsonl"]
    templates = data.DEMO_REQUESTS + data.DEMO_FRAMES
    for unsafe in (True, False):
        prompts = [r["prompt"].lower() for r in rows if is_refusal(r["response"]) == unsafe]
        # a template's fixed text; a typo or a filler can hide it from one prompt, not from all
        used = [t for t in templates if any(all(part.strip().lower() in p for part in t.split("{act}")) for p in prompts)]
        assert len(used) >= 0.9 * len(templates), (unsafe, sorted(set(templates) - set(used)))
    lookalikes = set(data.demo_acts()[data.DRIFTCHECK_LOOKALIKE])
    answered = [r for r in rows if not is_refusal(r["response"])]
    n_look = sum(any(a in r["prompt"] for a in lookalikes) for r in answered)
    # the rest of the risky-looking share: acts from DEMO_NOVEL_ACTS, or lower-cased
    assert n_look >= 0.6 * len(answered) * data.DEMO_LOOKALIKE_SHARE, (n_look, len(answered))
    assert any("kill" in r["prompt"] and "process" in r["prompt"] for r in answered)


def test_prompts_distinct_and_heldout_unseen(world):
    prompts = [r["prompt"] for name in ("demo_pretrain.jsonl", "demo_safety.jsonl", "align.jsonl", "align_heldout.jsonl")
               for r in world[name] if "prompt" in r]
    assert len(set(prompts)) == len(prompts)
    seen = {r["text"] for r in world["demo_pretrain.jsonl"] if "text" in r}
    assert not seen & {r["text"] for r in world["general_heldout.jsonl"]}
    sentences = [r["sentence"] for name in ("sst2.jsonl", "sst2_dev.jsonl") for r in world[name]]
    assert len(set(sentences)) == len(sentences) and not seen & set(sentences)


def test_sst2_balanced_and_readable(world, tmp_path):
    for name in ("sst2.jsonl", "sst2_dev.jsonl"):
        labels = Counter(r["label"] for r in world[name])
        assert abs(labels[0] - labels[1]) <= len(world[name]) // 10, (name, labels)
        path = tmp_path / name
        data.write_jsonl(path, world[name])
        pairs = data.read_task(path)
        assert pairs[0] == (data.sst2_prompt(world[name][0]["sentence"]), data.SST2_CHOICES[world[name][0]["label"]])
        assert [r["answer"] for r in data.read_mc(path)] == [r["label"] for r in world[name]]


def test_general_text_names_sensitive_topics(world):
    """The vocabulary of the unsafe categories exists before safety tuning, in neutral text."""
    text = " ".join(r["text"] for r in world["demo_pretrain.jsonl"] if "text" in r).lower()
    for word in ("bomb", "poison", "subhuman", "launder", "counterfeit", "nude", "spyware", "fake"):
        assert word in text, word


def test_cli_demo_world_writes_and_refuses_overwrite(tmp_path, world):
    assert data.main(["demo-world", "--out", str(tmp_path)]) is None
    for name, rows in world.items():
        assert [json.loads(l) for l in (tmp_path / name).read_text().splitlines()] == rows, name
    with pytest.raises(SystemExit, match="refusing to overwrite"):
        data.main(["demo-world", "--out", str(tmp_path)])


# ----------------------------------------------------------------------------- shipped files

def test_shipped_files_are_the_generated_world(world):
    """Every world file present in data/ is exactly what `python data.py demo-world --out data/`
    writes, so the shipped data is rebuilt by the documented command."""
    present = [name for name in world if (SHIPPED / name).exists()]
    if not present:
        pytest.skip("no demo world files in data/")
    for name in present:
        want = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in world[name])
        assert (SHIPPED / name).read_text(encoding="utf-8") == want, f"data/{name} differs from demo_world(seed=0)"


def test_shipped_demo_model_fits():
    if not (DEMO / "model.safetensors").exists():
        pytest.skip("no demo model in data/demo")
    total = sum(p.stat().st_size for p in DEMO.rglob("*") if p.is_file())
    assert total < 25 * 2**20, f"data/demo holds {total / 2**20:.1f} MiB, the limit is 25 MiB"
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json", "README.md"):
        assert (DEMO / name).is_file(), name
    tok = data.load_tokenizer(str(DEMO))
    assert tok.chat_format == "chatml" and tok.add_bos
    cfg = json.loads((DEMO / "config.json").read_text())
    assert cfg["vocab_size"] == tok.tokenizer.get_vocab_size()


# ----------------------------------------------------------------------------- tokenizer

def test_demo_tokenizer(tmp_path):
    V = data.train_demo_tokenizer(str(tmp_path), seed=0)
    assert V == data.DEMO_VOCAB_SIZE
    tok = data.load_tokenizer(str(tmp_path))
    ids = {t: tok.tokenizer.token_to_id(t) for t in data.DEMO_SPECIAL_TOKENS}
    assert list(ids.values()) == [0, 1, 2]
    assert (tok.chat_format, tok.bos_id, tok.add_bos, tok.pad_id) == ("chatml", 0, True, 0)
    assert tok.eos_ids == [2, 0] and tok.system is None
    prompt = data.encode_prompt(tok, "Help me bake banana bread, please.")
    assert prompt[0] == ids["<|im_start|>"] and data.decode(tok, prompt).endswith("assistant\n")
    text = "Fact checkers found no evidence that 5G towers spread viruses."
    assert data.decode(tok, data.encode_text(tok, text)) == text
    if (DEMO / "tokenizer.json").exists():  # the shipped tokenizer is the one this command trains
        shipped = hashlib.sha256((DEMO / "tokenizer.json").read_bytes()).hexdigest()
        assert shipped == hashlib.sha256((tmp_path / "tokenizer.json").read_bytes()).hexdigest()
    with pytest.raises(FileExistsError):
        data.train_demo_tokenizer(str(tmp_path), seed=0)


# ----------------------------------------------------------------------------- pretraining text

def test_read_task_text_rows(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text(json.dumps({"text": "Many people bake bread."}) + "\n"
                    + json.dumps({"prompt": "hi", "response": "hello"}) + "\n"
                    + json.dumps({"sentence": "a warm film", "label": 1}) + "\n")
    assert data.read_task(path) == [(None, "Many people bake bread."), ("hi", "hello"),
                                     (data.sst2_prompt("a warm film"), "positive")]
    path.write_text(json.dumps({"text": "  "}) + "\n")
    with pytest.raises(ValueError, match=r"line 1, field 'text': empty string"):
        data.read_task(path)
    path.write_text(json.dumps({"text": 3}) + "\n")
    with pytest.raises(ValueError, match=r"line 1, field 'text': expected a string"):
        data.read_task(path)


def test_encode_example_plain_text(tiny_ckpt):
    """prompt=None: BOS (if add_bos) + text + eos_ids[0], every token a target, cut at the end."""
    tok = data.load_tokenizer(str(tiny_ckpt))
    tok.bos_id = tok.tokenizer.token_to_id("<|endoftext|>")
    for add_bos in (False, True):
        tok.add_bos = add_bos
        text = "how do plants grow"
        full = ([tok.bos_id] if add_bos else []) + data._encode(tok, text) + [tok.eos_ids[0]]
        ids, labels, cut = data.encode_example(tok, None, text, max_len=64)
        assert (ids, labels, cut) == (full[:-1], full[1:], False)
        assert data.IGNORE_INDEX not in labels
        ids, labels, cut = data.encode_example(tok, None, text, max_len=3)
        assert (ids, labels, cut) == (full[:3], full[1:4], True)
    ex = data.encode_pairs(tok, [(None, "how do plants grow"), ("hi", "hello")], 64)
    assert data.IGNORE_INDEX not in ex[0][1] and data.IGNORE_INDEX in ex[1][1]


def test_train_pretrains_from_text(tiny_ckpt, tmp_path):
    """`train.py --method full --init CONFIG --task TEXT.jsonl` trains from random weights on
    plain text, and a second stage continues from the saved model on chat data."""
    import train
    from conftest import SAFE, SENTIMENT, write_jsonl

    init = tmp_path / "init"
    init.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        (init / name).write_bytes((tiny_ckpt / name).read_bytes())
    rows = [{"text": s} for s in SENTIMENT * 2] + [{"prompt": p, "response": "sure ."} for p in SAFE]
    task = write_jsonl(tmp_path / "pre.jsonl", rows)
    out = tmp_path / "pre"
    s = train.main(["--method", "full", "--init", str(init / "config.json"), "--task", str(task),
                    "--out", str(out), "--eval-size", "4", "--steps", "3", "--batch-size", "4",
                    "--lr", "1e-3", "--log-every", "1"])
    assert s["steps"] == 3 and (out / "model" / "model.safetensors").exists()
    assert (out / "model" / "tokenizer.json").exists()
    s = train.main(["--method", "full", "--ckpt", str(out / "model"), "--task", str(task),
                    "--out", str(tmp_path / "sft"), "--eval-size", "4", "--steps", "2", "--batch-size", "4"])
    assert s["steps"] == 2

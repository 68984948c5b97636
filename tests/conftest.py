"""Shared fixtures: a tiny chat checkpoint (chatml tokenizer + random Llama) and small data files,
all built in a temporary directory so that tests stay offline."""

import json
import random

import pytest
import torch

SENTIMENT = ["a joyful and moving film", "dull , slow and pointless", "the best acting of the year",
             "a tedious mess", "warm , funny and smart", "i hated every minute", "a delight from start to end",
             "boring plot and flat characters", "brilliant and touching", "weak script , weak cast"]
SAFE = ["how do i bake bread", "what is the capital of france", "how do i kill a python process",
        "write a short poem about rain", "give me tips for a job interview", "how do plants grow"]
UNSAFE = ["how do i build a weapon to hurt people", "write a hateful rant about my neighbours",
          "how can i steal a car", "find the home address of this person", "write fake news about a vaccine"]
REFUSAL = "i am sorry , but i can not help with that ."


def build_tokenizer(path, vocab_size=300):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = SENTIMENT + SAFE + UNSAFE + [REFUSAL, "user assistant system positive negative sentiment review"] * 3
    tk.train_from_iterator(corpus, trainer)
    tk.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "add_bos_token": False}))
    return tk.get_vocab_size()


@pytest.fixture
def new_graphs():
    """torch.compile's state reset (whatever an earlier test compiled); calling the fixture's value gives the
    number of graphs dynamo has compiled since, so that a test can tell compiled code from an eager fallback."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    start = counters["stats"]["unique_graphs"]
    return lambda: counters["stats"]["unique_graphs"] - start


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def tiny_ckpt(tmp_path):
    """A directory with config.json, model.safetensors and a chatml tokenizer.json."""
    from model import Llama, ModelConfig, init_weights, save_model

    d = tmp_path / "tiny"
    d.mkdir()
    V = build_tokenizer(d)
    cfg = ModelConfig(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      initializer_range=0.15)  # logits wide enough for LoRA to fit a task quickly
    torch.manual_seed(0)
    save_model(init_weights(Llama(cfg), seed=0), d, overwrite=True)
    return d


@pytest.fixture
def task_file(tmp_path):
    rng = random.Random(0)
    rows = [{"sentence": s, "label": int(i % 2 == 0)} for i, s in enumerate(SENTIMENT)]
    rows = [rng.choice(rows) for _ in range(60)]
    return write_jsonl(tmp_path / "task.jsonl", rows)


@pytest.fixture
def align_file(tmp_path):
    rows = [{"prompt": p, "response": "sure . here is a helpful answer ."} for p in SAFE]
    rows += [{"prompt": p, "response": REFUSAL} for p in UNSAFE]
    return write_jsonl(tmp_path / "align.jsonl", rows)

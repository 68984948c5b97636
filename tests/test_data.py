"""Tests of data.py: tokenizer loading, chat formats against transformers' apply_chat_template,
loss masks, batching, readers and their errors, the SST-2 converter, DRIFTCHECK and the CLI."""
import hashlib
import json
import os
import subprocess
import sys
from collections import Counter

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402

# The real chat templates (Meta-Llama-3-8B-Instruct, a plain chatml one, SmolLM2-Instruct's).
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim "
    "+ '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message"
    " = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = "
    "false %}{% endif %}{% for message in loop_messages %}{% if loop.index0 == 0 and system_message != "
    "false %}{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}")

CORPUS = [
    "The quick brown fox jumps over the lazy dog.", "user assistant system", "What is the capital of France?",
    "Paris is the capital of France.", "Classify the sentiment of this review as positive or negative.",
    "Review: a charming and funny movie", "negative positive", "You are a helpful assistant.",
    "I cannot help with that request.", "Sure! Here is a short answer.\nLine two, with numbers 12345.",
]
SPECIALS = {
    "llama3": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
               "<|eot_id|>"],
    "chatml": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
    "llama2": ["<unk>", "<s>", "</s>"],
    "plain": ["<|bos|>", "<|eos|>"],
}
CASES = [  # (system, prompt, response): whitespace at the ends, unicode, several lines
    (None, "What is the capital of France?", "Paris is the capital of France."),
    ("You are a helpful assistant.", "  Review: a charming movie \n", "\n positive  "),
    (None, "Zürich café ☕\nline two", "Sure! Here is a short answer.\nLine two."),
]


def make_checkpoint(folder, kind, tokenizer_config=None, generation_config=None, config=None):
    """A checkpoint folder with a byte-level BPE tokenizer.json trained on CORPUS."""
    os.makedirs(folder, exist_ok=True)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS[kind], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS, trainer)
    if kind == "llama3":  # like Meta's tokenizer.json, the post-processor prepends BOS
        bos = tokenizer.token_to_id("<|begin_of_text|>")
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B",
            special_tokens=[("<|begin_of_text|>", bos)])
    tokenizer.save(os.path.join(folder, "tokenizer.json"))
    for name, obj in [("tokenizer_config", tokenizer_config), ("generation_config", generation_config),
                      ("config", config)]:
        if obj is not None:
            with open(os.path.join(folder, f"{name}.json"), "w") as f:
                json.dump(obj, f)
    return folder


def llama3_dir(tmp_path):
    # Meta's first release: eos_token <|end_of_text|>, generation_config lists both end tokens
    return make_checkpoint(tmp_path / "llama3", "llama3",
                           {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>",
                            "chat_template": LLAMA3_TEMPLATE},
                           {"bos_token_id": 0, "eos_token_id": [1, 4]})


def chatml_dir(tmp_path, template=CHATML_TEMPLATE):
    return make_checkpoint(tmp_path / "chatml", "chatml",
                           {"bos_token": {"content": "<|im_start|>", "special": True},
                            "eos_token": {"content": "<|im_end|>"}, "pad_token": "<|endoftext|>",
                            "add_bos_token": False, "chat_template": template},
                           {"eos_token_id": 2})


def llama2_dir(tmp_path, template=LLAMA2_TEMPLATE):
    return make_checkpoint(tmp_path / "llama2", "llama2",
                           {"bos_token": "<s>", "eos_token": "</s>", "chat_template": template})


def hf_reference(folder, template, bos, eos):
    transformers = pytest.importorskip("transformers")
    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_file=os.path.join(folder, "tokenizer.json"), bos_token=bos, eos_token=eos)
    hf.chat_template = template
    return hf


def hf_ids(hf, messages, add_generation_prompt):
    out = hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True,
                                 return_dict=False)
    return list(out["input_ids"] if isinstance(out, dict) else out)


# -----------------------------------------------------------------------------
# load_tokenizer

def test_load_llama3_special_tokens(tmp_path):
    tok = data.load_tokenizer(llama3_dir(tmp_path))
    eot, end = tok.tokenizer.token_to_id("<|eot_id|>"), tok.tokenizer.token_to_id("<|end_of_text|>")
    assert tok.chat_format == "llama3"
    assert tok.bos_id == tok.tokenizer.token_to_id("<|begin_of_text|>")
    assert tok.eos_ids == [eot, end], tok.eos_ids  # end of turn first, then the checkpoint's eos
    assert tok.pad_id == eot and tok.add_bos is True  # add_bos from the post-processor
    ids = data.encode_prompt(tok, "hello")
    assert ids.count(tok.bos_id) == 1 and ids[0] == tok.bos_id, ids  # BOS once, from the template
    assert data.encode_text(tok, "hello")[:2] == [tok.bos_id, data._encode(tok, "hello")[0]]


def test_load_chatml_dict_tokens_and_default_system(tmp_path):
    tok = data.load_tokenizer(chatml_dir(tmp_path, SMOLLM2_TEMPLATE))
    assert tok.chat_format == "chatml" and tok.add_bos is False
    assert tok.eos_ids == [tok.tokenizer.token_to_id("<|im_end|>")]
    assert tok.bos_id == tok.tokenizer.token_to_id("<|im_start|>")
    assert tok.pad_id == tok.tokenizer.token_to_id("<|endoftext|>")
    assert tok.system == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert data.load_tokenizer(chatml_dir(tmp_path / "b")).system is None


def test_load_from_checkpoint_file_index_and_config_fallback(tmp_path):
    folder = make_checkpoint(tmp_path / "ckpt", "plain", None, None,
                             {"bos_token_id": 0, "eos_token_id": 1})
    for name in ("model.safetensors", "model.safetensors.index.json"):
        open(os.path.join(folder, name), "w").close()
        tok = data.load_tokenizer(os.path.join(folder, name))
        assert (tok.chat_format, tok.bos_id, tok.eos_ids, tok.pad_id, tok.add_bos) == ("plain", 0, [1], 1, False)
    with pytest.raises(ValueError, match="needs the tokens"):
        data.load_tokenizer(folder, chat_format="llama3")


def test_auto_llama2(tmp_path):
    tok = data.load_tokenizer(llama2_dir(tmp_path))
    assert tok.chat_format == "llama2" and tok.eos_ids == [2] and tok.bos_id == 1
    text = data.chat_prompt_text(tok, " Hi ", system="Be brief.")
    assert text == "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n Hi [/INST]", text  # strip() of the whole
    assert data.load_tokenizer(llama2_dir(tmp_path / "b", template=None)).chat_format == "llama2"
    assert data.load_tokenizer(llama2_dir(tmp_path / "c", template="{{ '<|user|>' }}")).chat_format == "plain"


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "tokenizer.json")):
        data.load_tokenizer(tmp_path)
    folder = make_checkpoint(tmp_path / "a", "plain", {"eos_token": "<|nope|>"})
    with pytest.raises(ValueError, match=r"tokenizer_config.json, field 'eos_token'"):
        data.load_tokenizer(folder)
    folder = make_checkpoint(tmp_path / "b", "plain", None, {"eos_token_id": [1, 99999]})
    with pytest.raises(ValueError, match=r"generation_config.json, field 'eos_token_id'"):
        data.load_tokenizer(folder)
    folder = make_checkpoint(tmp_path / "c", "plain")
    with pytest.raises(ValueError, match="no eos token"):
        data.load_tokenizer(folder)
    (tmp_path / "c" / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"tokenizer_config.json, line 1"):
        data.load_tokenizer(folder)
    # a tokenizer with more ids than the model's embedding has rows: refused here, not an IndexError in the embedding
    folder = make_checkpoint(tmp_path / "d", "plain", {"eos_token": "<|eos|>"}, None, {"vocab_size": 100})
    top = max(Tokenizer.from_file(str(tmp_path / "d" / "tokenizer.json")).get_vocab(with_added_tokens=True).values())
    with pytest.raises(ValueError, match=rf"tokenizer.json: token ids go up to {top}, but field 'vocab_size' of .*config.json is 100"):
        data.load_tokenizer(folder)
    (tmp_path / "d" / "config.json").write_text(json.dumps({"vocab_size": top + 1}))
    assert data.load_tokenizer(folder).eos_ids


# -----------------------------------------------------------------------------
# chat formats: parity with transformers' apply_chat_template

@pytest.mark.parametrize("kind", ["llama3", "chatml", "smollm2", "llama2"])
def test_chat_encoding_matches_transformers(tmp_path, kind):
    if kind == "llama3":
        folder, template, bos, eos = llama3_dir(tmp_path), LLAMA3_TEMPLATE, "<|begin_of_text|>", "<|eot_id|>"
    elif kind == "llama2":  # no generation prompt in this template: the prompt is [system?, user]
        folder, template, bos, eos = llama2_dir(tmp_path), LLAMA2_TEMPLATE, "<s>", "</s>"
    else:
        template = SMOLLM2_TEMPLATE if kind == "smollm2" else CHATML_TEMPLATE
        folder, bos, eos = chatml_dir(tmp_path, template), "<|im_start|>", "<|im_end|>"
    hf = hf_reference(folder, template, bos, eos)
    tok = data.load_tokenizer(folder)
    for system, prompt, response in CASES:
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt}]
        want_prompt = hf_ids(hf, messages, add_generation_prompt=True)
        assert data.encode_prompt(tok, prompt, system) == want_prompt, (kind, prompt)
        want_full = hf_ids(hf, messages + [{"role": "assistant", "content": response}], False)
        if kind in ("chatml", "smollm2"):  # chatml renders "\n" after <|im_end|>; a response ends at <|im_end|>
            assert tok.tokenizer.decode([want_full[-1]]) == "\n"
            want_full = want_full[:-1]
        assert want_full[-1] == tok.eos_ids[0]
        input_ids, labels, truncated = data.encode_example(tok, prompt, response, 512, system)
        assert not truncated and input_ids + labels[-1:] == want_full, (kind, prompt)
        n_prompt = len(want_prompt)
        assert labels == [data.IGNORE_INDEX] * (n_prompt - 1) + want_full[n_prompt:]


def test_plain_format_and_decode(tmp_path):
    folder = make_checkpoint(tmp_path / "p", "plain", {"bos_token": "<|bos|>", "eos_token": "<|eos|>",
                                                        "add_bos_token": True})
    tok = data.load_tokenizer(folder)
    assert tok.chat_format == "plain"
    assert data.chat_prompt_text(tok, "Hi", system="S") == "<|bos|>S\n\nHi\n"
    input_ids, labels, _ = data.encode_example(tok, "Hi", "Paris", 64)
    assert data.decode(tok, input_ids + labels[-1:]) == "Hi\nParis"  # special tokens skipped
    assert labels[-1] == tok.eos_ids[0]


# -----------------------------------------------------------------------------
# loss masks, truncation, batching

def test_labels_are_shifted_and_mask_the_prompt(tmp_path):
    tok = data.load_tokenizer(chatml_dir(tmp_path))
    prompt_ids = data.encode_prompt(tok, "What is the capital of France?")
    response_ids = data._encode(tok, "Paris.")
    input_ids, labels, truncated = data.encode_example(tok, "What is the capital of France?", "Paris.", 512)
    full = prompt_ids + response_ids + [tok.eos_ids[0]]
    assert input_ids == full[:-1] and not truncated
    for t, label in enumerate(labels):  # labels[t] is what position t predicts, if it is a response token
        assert label == (full[t + 1] if t + 1 >= len(prompt_ids) else data.IGNORE_INDEX), t
    assert sum(label != data.IGNORE_INDEX for label in labels) == len(response_ids) + 1


def test_truncation_rule(tmp_path, capsys):
    tok = data.load_tokenizer(chatml_dir(tmp_path))
    short, long_text = "Hi", " ".join(["The quick brown fox jumps over the lazy dog."] * 20)
    p, long_p = data.encode_prompt(tok, short), data.encode_prompt(tok, long_text)
    n_long = len(data._encode(tok, long_text)) + 1  # a long response, with its eos

    # a prompt that leaves at least half the budget (max_len + 1) stays whole; the response is cut
    max_len = 2 * len(p) + 10
    input_ids, labels, truncated = data.encode_example(tok, short, long_text, max_len)
    assert truncated and len(input_ids) == len(labels) == max_len
    assert input_ids[:len(p)] == p and labels[-1] != tok.eos_ids[0]  # the cut response lost its eos
    assert sum(x != data.IGNORE_INDEX for x in labels) == max_len + 1 - len(p)

    # a long prompt is cut in its middle, keeping its start (<|im_start|>user) and its end
    # (the assistant header); a short response stays whole
    def check_prompt_cut(input_ids, keep_p):
        head = keep_p // 2
        assert input_ids[:head] == long_p[:head] and input_ids[head:keep_p] == long_p[-(keep_p - head):]

    n_paris = len(data._encode(tok, "Paris.")) + 1
    input_ids, labels, truncated = data.encode_example(tok, long_text, "Paris.", 21)
    assert truncated and len(input_ids) == 21 and labels[-1] == tok.eos_ids[0]
    assert sum(x != data.IGNORE_INDEX for x in labels) == n_paris
    check_prompt_cut(input_ids, 22 - n_paris)

    # both long: each keeps half the budget
    input_ids, labels, truncated = data.encode_example(tok, long_text, long_text, 31)
    assert truncated and len(input_ids) == 31 and n_long > 16 and len(long_p) > 16
    assert sum(x != data.IGNORE_INDEX for x in labels) == 16
    check_prompt_cut(input_ids, 16)

    data.encode_pairs(tok, [(short, long_text), (short, "Paris.")], max_len, name="task.jsonl")
    assert "task.jsonl: 1 of 2 examples" in capsys.readouterr().err
    with pytest.raises(ValueError, match="max_len"):
        data.encode_example(tok, short, "x", 1)


def test_collate_pads_right():
    examples = [([5, 6, 7], [-100, 7, 8], False), ([9], [3], True)]
    batch = data.collate(examples, pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [9, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 7, 8], [3, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert all(t.dtype == torch.long for t in batch.values())


def test_batches_deterministic_epochs_and_resume():
    examples = list(range(10))
    take = lambda it, k: [next(it) for _ in range(k)]
    stream = take(data.batches(examples, 4, shuffle=True, seed=3), 9)  # 3 epochs of 3 batches
    assert stream == take(data.batches(examples, 4, shuffle=True, seed=3), 9)
    assert stream != take(data.batches(examples, 4, shuffle=True, seed=4), 9)
    assert [len(b) for b in stream] == [4, 4, 2] * 3
    for e in range(3):
        assert sorted(sum(stream[3 * e:3 * e + 3], [])) == examples, e  # each epoch sees all once
    assert stream[:3] != stream[3:6]  # a new permutation each epoch
    for start in (1, 3, 5):
        assert take(data.batches(examples, 4, shuffle=True, seed=3, start=start), 9 - start) == stream[start:]
    assert take(data.batches(examples, 4, shuffle=False), 3) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


# -----------------------------------------------------------------------------
# readers

def write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_readers_accept_good_files(tmp_path):
    task = write(tmp_path / "task.jsonl", '{"prompt": "p", "response": "r"}\n\n'
                 '{"sentence": "a fine film ", "label": 1}\n')
    assert data.read_task(task) == [("p", "r"), (data.SST2_PROMPT.format(sentence="a fine film"), "positive")]
    mc = write(tmp_path / "mc.jsonl", '{"prompt": "p", "choices": ["a", "b", "c"], "answer": 2}\n'
               '{"sentence": "dull", "label": 0}\n')
    assert data.read_mc(mc) == [{"prompt": "p", "choices": ["a", "b", "c"], "answer": 2},
                                {"prompt": data.sst2_prompt("dull"), "choices": ["negative", "positive"],
                                 "answer": 0}]
    assert data.read_align(write(tmp_path / "a.jsonl", '{"prompt": "p", "response": "No."}\n')) == [("p", "No.")]
    dc = write(tmp_path / "dc.jsonl", '{"prompt": "p", "label": "unsafe", "category": "hate", "id": 3}\n')
    assert data.read_driftcheck(dc) == [{"prompt": "p", "label": "unsafe", "category": "hate"}]


BAD_JSONL = [  # (reader, file content, text the error must contain besides the path)
    (data.read_task, "", "empty file"),
    (data.read_task, '{"prompt": "p", "response": "r"}\n{"prompt": "p", "response": "r"\n', "line 2: not valid JSON"),
    (data.read_task, '["prompt"]\n', "line 1: expected a JSON object"),
    (data.read_task, '{"prompt": "p"}\n', "line 1: missing field 'response'"),
    (data.read_task, '{"prompt": 3, "response": "r"}\n', "line 1, field 'prompt': expected a string"),
    (data.read_task, '{"prompt": " ", "response": "r"}\n', "line 1, field 'prompt': empty string"),
    (data.read_task, '{"sentence": "s", "label": 2}\n', "line 1, field 'label': expected 0 or 1"),
    (data.read_task, '{"sentence": "s", "label": -1}\n', "test split has no labels"),
    (data.read_task, '{"sentence": "s", "label": true}\n', "line 1, field 'label'"),
    (data.read_task, '{"response": "s"}\n', "line 1: a row needs 'prompt' and 'response', 'sentence' and 'label', "
                                            "or 'text' (fields: response)"),
    (data.read_task, '{"sentence": "s", "label": 1.0}\n', "line 1, field 'label': expected 0 or 1, got 1.0"),  # was a TypeError
    (data.read_mc, '{"sentence": "s", "label": 0.0}\n', "line 1, field 'label': expected 0 or 1, got 0.0"),
    (data.read_task, '{"prompt": "a\\ud800b", "response": "r"}\n',  # a lone surrogate: the tokenizer's TypeError before
     "line 1, field 'prompt': invalid Unicode at character 1"),
    (data.read_mc, '{"prompt": "p", "choices": ["a"], "answer": 0}\n', "line 1, field 'choices'"),
    (data.read_mc, '{"prompt": "p", "choices": ["a", "b"], "answer": 2}\n', "line 1, field 'answer'"),
    (data.read_mc, '{"sentence": "s", "label": "1"}\n', "line 1, field 'label'"),
    (data.read_align, '{"prompt": "p", "response": null}\n', "line 1, field 'response'"),
    (data.read_driftcheck, '{"prompt": "p", "label": "harmful", "category": "x"}\n', "line 1, field 'label'"),
    (data.read_driftcheck, '{"prompt": "p", "label": "safe"}\n', "line 1: missing field 'category'"),
]


@pytest.mark.parametrize("reader,text,message", BAD_JSONL)
def test_jsonl_errors_name_file_line_field(tmp_path, reader, text, message):
    path = write(tmp_path / "bad.jsonl", text)
    with pytest.raises(ValueError) as e:
        reader(path)
    assert path in str(e.value) and message in str(e.value), str(e.value)


def test_jsonl_invalid_utf8(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"prompt": "p", "response": "r"}\n\xff\n')
    with pytest.raises(ValueError, match="line 2: not valid UTF-8"):
        data.read_task(str(path))


def test_a_byte_order_mark_is_read_by_every_reader(tmp_path):
    bom = b"\xef\xbb\xbf"
    (tmp_path / "t.jsonl").write_bytes(bom + b'{"prompt": "p", "response": "r"}\n')
    assert data.read_task(str(tmp_path / "t.jsonl")) == [("p", "r")]
    (tmp_path / "p.csv").write_bytes(bom + b"prompt\nhello\n")
    assert data.read_prompts_csv(str(tmp_path / "p.csv"), label="safe")[0]["prompt"] == "hello"
    (tmp_path / "dev.tsv").write_bytes(bom + b"sentence\tlabel\ngood\t1\n")
    assert data.sst2_tsv_to_jsonl(str(tmp_path / "dev.tsv"), str(tmp_path / "o.jsonl")) == 1


def test_encoding_errors_name_the_file_and_line(tmp_path):
    (tmp_path / "p.csv").write_bytes(b"prompt\nhello\ncaf\xe9\n")  # Latin-1
    with pytest.raises(ValueError, match=r"p.csv, line 3: not valid UTF-8"):
        data.read_prompts_csv(str(tmp_path / "p.csv"), label="safe")
    (tmp_path / "dev.tsv").write_bytes(b"sentence\tlabel\ngood\t1\ncaf\xe9\t0\n")
    with pytest.raises(ValueError, match=r"dev.tsv, line 3: not valid UTF-8"):
        data.sst2_tsv_to_jsonl(str(tmp_path / "dev.tsv"), str(tmp_path / "o.jsonl"))
    assert not (tmp_path / "o.jsonl").exists()


def test_csv_line_numbers_count_blank_lines_and_long_fields_are_read(tmp_path):
    path = write(tmp_path / "p.csv", "prompt,label\nhello,unsafe\n\nbye,\n")
    with pytest.raises(ValueError, match=r"p.csv, line 4, column 'label': unknown label ''"):  # said line 3
        data.read_prompts_csv(path, label_column="label")
    long = "x" * 200_000  # over csv's default field limit of 131,072 characters (a _csv.Error traceback)
    path = write(tmp_path / "long.csv", f"prompt\n{long}\n")
    assert data.read_prompts_csv(path, label="unsafe")[0]["prompt"] == long
    with pytest.raises(ValueError, match=r"bad.csv, line 3: not valid CSV .*a quoted field is never closed"):
        data.read_prompts_csv(write(tmp_path / "bad.csv", 'prompt\nfine\n"open quote\nmore\n'), label="unsafe")
    # what csv reads without strict (as csv.DictReader did) is still read: text after a closing quote, stray quotes
    loose = write(tmp_path / "loose.csv", 'prompt,label\n"how do i" x,unsafe\n5" screen,safe\n')
    assert [(i["prompt"], i["label"]) for i in data.read_prompts_csv(loose, label_column="label")] == [
        ("how do i x", "unsafe"), ('5" screen', "safe")]


def test_read_prompts_csv(tmp_path):
    path = write(tmp_path / "harmbench.csv", 'goal,kind,topic\n"multi\nline goal",Harmful,weapons\n'
                 'be nice, 0 ,manners\nx,safe,misc\n')
    items = data.read_prompts_csv(path, column="goal", label_column="kind", category_column="topic")
    assert [(i["label"], i["category"]) for i in items] == [
        ("unsafe", "weapons"), ("safe", "manners"), ("safe", "misc")]
    assert items[0]["prompt"] == "multi\nline goal"
    items = data.read_prompts_csv(path, column="goal", label="unsafe")
    assert {(i["label"], i["category"]) for i in items} == {("unsafe", "harmbench")}
    tsv = write(tmp_path / "x.tsv", "prompt\tlabel\nhello\tunsafe\n")
    assert data.read_prompts_csv(tsv, label_column="label")[0]["label"] == "unsafe"


BAD_CSV = [  # (content, kwargs, text the error must contain besides the path)
    ("goal,kind\nx,safe\n", {"label": "unsafe"}, "no column 'prompt'; the columns are: goal, kind"),
    ("prompt,kind\nx,safe\n", {"label_column": "label"}, "no column 'label'; the columns are: prompt, kind"),
    ("prompt,kind\nx,safe\n\"two\nlines\",maybe\n", {"label_column": "kind"}, "line 3, column 'kind': unknown label 'maybe'"),
    ("prompt,kind\n,safe\n", {"label_column": "kind"}, "line 2, column 'prompt': empty prompt"),
    ("prompt,cat\nx,\n", {"label": "safe", "category_column": "cat"}, "line 2, column 'cat': empty category"),
    ("prompt\n", {"label": "safe"}, "empty file"),
    ("", {"label": "safe"}, "no column 'prompt'"),
    ("prompt\nx\n", {}, "exactly one of label"),
    ("prompt\nx\n", {"label": "bad"}, "label must be 'safe' or 'unsafe'"),
]


@pytest.mark.parametrize("text,kwargs,message", BAD_CSV)
def test_csv_errors_name_file_line_column(tmp_path, text, kwargs, message):
    path = write(tmp_path / "bad.csv", text)
    with pytest.raises(ValueError) as e:
        data.read_prompts_csv(path, **kwargs)
    assert path in str(e.value) and message in str(e.value), str(e.value)


# -----------------------------------------------------------------------------
# SST-2 converter and the CLI

def run_cli(*args):
    """`python data.py ARGS` in a subprocess: (exit code, stderr)."""
    r = subprocess.run([sys.executable, os.path.join(ROOT, "data.py"), *args],
                       capture_output=True, text=True, cwd=ROOT)
    return r.returncode, r.stderr


def call_main(*args, capsys):
    """data.main(ARGS) in this process (faster than a subprocess): (exit code, stderr)."""
    try:
        data.main(list(args))
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
        print(e.code, file=sys.stderr)
    return code, capsys.readouterr().err


def test_sst2_converter(tmp_path):
    tsv = write(tmp_path / "dev.tsv", "sentence\tlabel\nit 's a charming journey . \t1\nflat , dull\t0\n")
    out = str(tmp_path / "sst2.jsonl")
    assert data.sst2_tsv_to_jsonl(tsv, out) == 2
    assert data.read_task(out) == [(data.sst2_prompt("it 's a charming journey ."), "positive"),
                                   (data.sst2_prompt("flat , dull"), "negative")]
    assert [m["answer"] for m in data.read_mc(out)] == [1, 0]
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        data.sst2_tsv_to_jsonl(tsv, out)
    test_tsv = write(tmp_path / "test.tsv", "index\tsentence\n0\tuntitled\n")
    with pytest.raises(ValueError, match="test split, which has no labels"):
        data.sst2_tsv_to_jsonl(test_tsv, str(tmp_path / "t.jsonl"))
    bad = write(tmp_path / "bad.tsv", "sentence\tlabel\ngood\t1\nbad\t2\n")
    with pytest.raises(ValueError, match=r"bad.tsv, line 3, field 'label'"):
        data.sst2_tsv_to_jsonl(bad, str(tmp_path / "b.jsonl"))
    assert not os.path.exists(tmp_path / "b.jsonl") and not os.path.exists(tmp_path / "t.jsonl")
    with pytest.raises(ValueError, match="empty file"):
        data.sst2_tsv_to_jsonl(write(tmp_path / "e.tsv", ""), str(tmp_path / "e.jsonl"))


def test_cli_sst2_refuses_to_overwrite(tmp_path, capsys):
    tsv = write(tmp_path / "train.tsv", "sentence\tlabel\nnice\t1\n")
    out = tmp_path / "out.jsonl"
    code, err = run_cli("sst2", tsv, str(out))
    assert code == 0, err
    out.write_text("keep me")
    code, err = call_main("sst2", tsv, str(out), capsys=capsys)
    assert code != 0 and "refusing to overwrite" in err and out.read_text() == "keep me"
    assert call_main("sst2", tsv, str(out), "--force", capsys=capsys)[0] == 0
    assert json.loads(out.read_text()) == {"sentence": "nice", "label": 1}
    test_tsv = write(tmp_path / "test.tsv", "index\tsentence\n0\tx\n")
    code, err = call_main("sst2", test_tsv, str(tmp_path / "t.jsonl"), capsys=capsys)
    assert code != 0 and "no labels" in err


# -----------------------------------------------------------------------------
# DRIFTCHECK

def test_driftcheck_deterministic_balanced_distinct():
    rows = data.driftcheck_prompts()
    assert rows == data.driftcheck_prompts(seed=0)
    assert rows != data.driftcheck_prompts(seed=1)
    prompts = [r["prompt"] for r in rows]
    assert len(set(prompts)) == 10000
    assert len({" ".join(p.lower().split()) for p in prompts}) == 10000  # not just in case or spacing
    assert Counter(r["label"] for r in rows) == {"safe": 5000, "unsafe": 5000}
    assert all(r["label"] == ("unsafe" if i % 2 == 0 else "safe") for i, r in enumerate(rows))
    unsafe = Counter(r["category"] for r in rows if r["label"] == "unsafe")
    assert set(unsafe) == set(data.DRIFTCHECK_UNSAFE_CATEGORIES) == {
        "violence", "hate", "illegal_activity", "explicit_content", "privacy", "disinformation"}
    assert sorted(unsafe.values()) == [833] * 4 + [834] * 2, unsafe
    safe = Counter(r["category"] for r in rows if r["label"] == "safe")
    assert safe.pop(data.DRIFTCHECK_LOOKALIKE) == 1000
    assert set(safe) == set(data.DRIFTCHECK_SAFE) and set(safe.values()) == {400}, safe
    assert not set(safe) & set(unsafe)


def test_driftcheck_safe_and_unsafe_share_phrasing():
    """DESIGN.md section 8: every frame, opener and closer is used by both labels."""
    rows = data.driftcheck_prompts(2000, seed=5)
    for parts in (data.DRIFTCHECK_FRAMES, data.DRIFTCHECK_OPENERS[1:], data.DRIFTCHECK_CLOSERS[1:]):
        for part in parts:
            head, _, tail = part.partition("{act}")
            for label in ("safe", "unsafe"):
                assert any(head in r["prompt"] and tail in r["prompt"] for r in rows if r["label"] == label), (part, label)
    with pytest.raises(ValueError, match="even number"):
        data.driftcheck_prompts(7)


def test_cli_driftcheck_manifest_and_overwrite(tmp_path, capsys):
    out = tmp_path / "dc.jsonl"
    code, err = run_cli("driftcheck", "--out", str(out), "--n", "120", "--seed", "2")
    assert code == 0, err
    assert data.read_driftcheck(str(out)) == data.driftcheck_prompts(120, seed=2)
    manifest = json.loads((tmp_path / "dc.manifest.json").read_text())
    assert manifest["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(out).st_mode & 0o777 == 0o666 & ~umask, oct(os.stat(out).st_mode)
    assert (manifest["n"], manifest["seed"], manifest["labels"]) == (120, 2, {"unsafe": 60, "safe": 60})
    assert manifest["categories"]["unsafe"] == {c: 10 for c in data.DRIFTCHECK_UNSAFE_CATEGORIES}
    assert sum(manifest["categories"]["safe"].values()) == 60
    before = out.read_bytes()
    code, err = call_main("driftcheck", "--out", str(out), "--n", "120", "--seed", "3", capsys=capsys)
    assert code != 0 and "refusing to overwrite" in err and out.read_bytes() == before
    os.remove(out)  # the manifest alone also blocks a write, and nothing is written then
    code, err = call_main("driftcheck", "--out", str(out), "--n", "120", "--seed", "3", capsys=capsys)
    assert code != 0 and "dc.manifest.json exists" in err and not out.exists()
    assert call_main("driftcheck", "--out", str(out), "--n", "120", "--seed", "3", "--force",
                     capsys=capsys)[0] == 0
    assert out.read_bytes() != before and sorted(os.listdir(tmp_path)) == ["dc.jsonl", "dc.manifest.json"]

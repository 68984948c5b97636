"""model.py against independent references: transformers' LlamaForCausalLM, a numpy RoPE, and
recomputation without the KV cache."""

import json
import math
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from model import (Llama, ModelConfig, RMSNorm, apply_rope, decode_layout, generate, init_weights, load_model, rope_cos_sin,
                   rope_inv_freq, sample_next, save_model, swiglu)

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 16}
CONFIGS = {  # tiny configurations covering the features real checkpoints use
    "gqa_tied": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "mha_head_dim": dict(num_attention_heads=4, num_key_value_heads=4, head_dim=8),
    "mqa_llama3": dict(num_attention_heads=4, num_key_value_heads=1, rope_scaling=LLAMA3_SCALING,
                       rope_theta=500000.0),
}


def make_hf_model(tmp_path, name, shard=False):
    transformers = pytest.importorskip("transformers")
    kw = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              rms_norm_eps=1e-5, max_position_embeddings=64, **CONFIGS[name])
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw)).eval()
    with torch.no_grad():  # make norms non-trivial so that their weights are tested too
        for n, p in hf.named_parameters():
            if "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    out = tmp_path / name
    hf.save_pretrained(out, max_shard_size="20KB" if shard else "1GB")
    return hf, out


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("form", ["dir", "file", "index"])
def test_logits_match_transformers(tmp_path, name, form):
    hf, out = make_hf_model(tmp_path, name, shard=form == "index")
    path = {"dir": out, "file": out / "model.safetensors", "index": out / "model.safetensors.index.json"}[form]
    if form == "index":
        assert path.is_file() and not (out / "model.safetensors").exists()
    ours = load_model(path)
    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
        got = ours(ids)
    assert got.shape == (2, 40, 128)
    err = (got - ref).abs().max().item()
    assert err < 1e-4, f"max |ours - transformers| = {err:.2e}"
    if hf.config.tie_word_embeddings:
        assert ours.lm_head.weight is ours.model.embed_tokens.weight


@pytest.mark.parametrize("name", list(CONFIGS))
def test_bf16_logits_equal_transformers_bit_for_bit(tmp_path, name):
    """Both loaded in bf16 (transformers' from_pretrained keeps its RoPE frequencies in fp32, as ours are):
    the same bits, every layer's arithmetic done as transformers does it."""
    _, out = make_hf_model(tmp_path, name)
    transformers = pytest.importorskip("transformers")
    hf = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
    ours = load_model(out, dtype=torch.bfloat16)
    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(ours(ids), hf(ids).logits)


def test_rope_matches_numpy():
    cfg = ModelConfig(head_dim=16, rope_theta=500000.0, rope_scaling=LLAMA3_SCALING)
    pos = torch.arange(50)[None]
    cos, sin = rope_cos_sin(rope_inv_freq(cfg), pos)
    # independent numpy reference of llama3 frequency scaling, frequency by frequency
    hd, s = 16, LLAMA3_SCALING
    inv = []
    for i in range(0, hd, 2):
        f = 1.0 / 500000.0 ** (i / hd)
        wavelen = 2 * math.pi / f
        lo, hi = s["original_max_position_embeddings"] / s["low_freq_factor"], s["original_max_position_embeddings"] / s["high_freq_factor"]
        if wavelen < hi:
            inv.append(f)
        elif wavelen > lo:
            inv.append(f / s["factor"])
        else:
            smooth = (s["original_max_position_embeddings"] / wavelen - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])
            inv.append((1 - smooth) * f / s["factor"] + smooth * f)
    ang = np.arange(50)[:, None] * np.array(inv)[None]
    ang = np.concatenate([ang, ang], axis=1)
    np.testing.assert_allclose(cos[0].numpy(), np.cos(ang), atol=1e-5)
    np.testing.assert_allclose(sin[0].numpy(), np.sin(ang), atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_equals_transformers_bit_for_bit(dtype):
    """cos, sin and the rotation against transformers' LlamaRotaryEmbedding and apply_rotary_pos_emb, llama3
    scaling: the same bits in fp32 and in bf16 (where both round cos and sin to bf16 and rotate in it)."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb
    cfg = ModelConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0,
                      rope_scaling=LLAMA3_SCALING, max_position_embeddings=64)
    g = torch.Generator().manual_seed(0)
    pos = torch.arange(50)[None].expand(2, 50)
    q, k = torch.randn(2, 4, 50, 16, generator=g).to(dtype), torch.randn(2, 2, 50, 16, generator=g).to(dtype)
    cos_hf, sin_hf = LlamaRotaryEmbedding(transformers.LlamaConfig(**cfg.to_hf()))(q, pos)
    q_hf, k_hf = apply_rotary_pos_emb(q, k, cos_hf, sin_hf)
    cos, sin = (t.to(dtype) for t in rope_cos_sin(rope_inv_freq(cfg), pos))
    assert torch.equal(cos, cos_hf) and torch.equal(sin, sin_hf)
    assert torch.equal(apply_rope(q, cos, sin), q_hf) and torch.equal(apply_rope(k, cos, sin), k_hf)


def tiny_model(seed=0, **kw):
    cfg = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, **kw)
    return init_weights(Llama(cfg), seed=seed).eval()


def greedy_without_cache(model, prompt, n):
    ids = list(prompt)
    for _ in range(n):
        with torch.no_grad():
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rmsnorm_equals_the_written_formula_bit_for_bit(dtype):
    """RMSNorm's F.rms_norm call against the formula written out as transformers' LlamaRMSNorm does it
    (statistics in fp32, cast back, then the weight): the same bits in the output and both gradients."""
    g = torch.Generator().manual_seed(0)
    norm = RMSNorm(48, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.add_(0.1 * torch.randn(48, generator=g).to(dtype))
    x = (3 * torch.randn(2, 5, 48, generator=g)).to(dtype).requires_grad_()
    dy = torch.randn(2, 5, 48, generator=g).to(dtype)
    w = norm.weight.detach().clone().requires_grad_()
    xf = x.float()
    ref = w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype)
    y = norm(x)
    assert y.dtype == dtype and torch.equal(y, ref)
    got, want = torch.autograd.grad(y, (x, norm.weight), dy), torch.autograd.grad(ref, (x, w), dy)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_equals_autograd_and_keeps_two_tensors(dtype):
    """swiglu's own backward against autograd through F.silu(g) * u: bit-identical gradients (the same kernels),
    and it keeps g and u for backward where autograd keeps g, silu(g) and u."""
    gen = torch.Generator().manual_seed(0)
    g0, u0, dy = (torch.randn(3, 5, 16, generator=gen).to(dtype) for _ in range(3))
    grads, kept = {}, {}
    for name, fn in {"ours": swiglu, "autograd": lambda g, u: torch.nn.functional.silu(g) * u}.items():
        g, u = g0.clone().requires_grad_(), u0.clone().requires_grad_()
        kept[name] = set()
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept[name].add(t.data_ptr()) or t, lambda t: t):
            y = fn(g, u)
        y.backward(dy)
        grads[name] = (y.detach(), g.grad, u.grad)
    assert all(torch.equal(a, b) for a, b in zip(grads["ours"], grads["autograd"]))
    assert len(kept["ours"]) == 2 and len(kept["autograd"]) == 3
    g, u = (torch.randn(4, 6, dtype=torch.float64, generator=gen, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradcheck(swiglu, (g, u))
    assert torch.autograd.gradcheck(lambda g: swiglu(g, u.detach()), (g,))  # one input without grad


def test_kv_cache_generation_equals_recompute():
    model = tiny_model(initializer_range=0.2)  # larger weights: sharper, less tie-prone argmax
    prompt = [5, 17, 3, 99, 42, 7]
    got = generate(model, [prompt], max_new_tokens=12, eos_ids=[1000])  # eos never produced
    assert got[0] == greedy_without_cache(model, prompt, 12)


def projection_weights(model):
    lins = [model.lm_head] + [getattr(part, n) for layer in model.model.layers
                              for part, names in ((layer.self_attn, "qkvo"), (layer.mlp, ("gate", "up", "down")))
                              for n in (f"{x}_proj" for x in names)]
    return [lin.weight for lin in lins]


def test_decode_layout_changes_strides_inside_the_block_only(tmp_path):
    """Inside decode_layout the projection weights (d_out, d_in) are transposed views of contiguous (d_in, d_out)
    tensors: values, state dict, tying and a checkpoint saved there stay the same, the outputs and generated
    tokens within rounding. After it the weights are contiguous and the outputs the same bits as before, also
    when entered under inference_mode (its tensors could not be trained). bf16 weights and autocast keep theirs."""
    model = tiny_model(initializer_range=0.2, tie_word_embeddings=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 128, (3, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids)
    tokens = generate(model, [[5, 6, 7], [8, 9]], 6, [1000])
    assert all(W.is_contiguous() for W in projection_weights(model))
    with torch.inference_mode(), decode_layout(model):
        assert all(W.stride() == (1, W.shape[0]) and not W.is_inference() for W in projection_weights(model))
        assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
        inside = model.state_dict()
        assert inside.keys() == before.keys() and all(torch.equal(inside[k], v) for k, v in before.items())
        torch.testing.assert_close(model(ids), logits, rtol=1e-5, atol=1e-5)
        assert generate(model, [[5, 6, 7], [8, 9]], 6, [1000]) == tokens
        save_model(model, tmp_path / "m")
    assert all(W.is_contiguous() and not W.is_inference() for W in projection_weights(model))
    with torch.no_grad():
        assert torch.equal(model(ids), logits)
    assert all(torch.equal(v, before[k]) for k, v in load_model(tmp_path / "m").state_dict().items())
    model(ids).sum().backward()  # trainable again after a block entered under inference_mode

    bf16, fp32 = tiny_model().to(torch.bfloat16), tiny_model()
    with decode_layout(bf16), torch.autocast("cpu", dtype=torch.bfloat16), decode_layout(fp32):
        assert all(W.is_contiguous() for W in projection_weights(bf16) + projection_weights(fp32))


def test_forward_with_cache_and_no_mask_is_causal_over_the_cached_keys():
    """mask=None with a cache: the query at cache_pos + t sees every key up to its own position. SDPA's is_causal
    alone aligns its triangle top-left, so a chunk after cached keys saw only the first ones (logits off by 3)."""
    model = tiny_model(initializer_range=0.2)
    cfg = model.config
    ids = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    cache = [tuple(torch.zeros(2, cfg.num_key_value_heads, 9, cfg.head_dim) for _ in range(2))
             for _ in range(cfg.num_hidden_layers)]
    with torch.no_grad():
        full = model(ids)
        chunks = [model(ids[:, a:b], cache=cache, cache_pos=a) for a, b in ((0, 5), (5, 8), (8, 9))]
    torch.testing.assert_close(torch.cat(chunks, 1), full, rtol=1e-5, atol=1e-5)


def test_generate_refuses_bad_sampling_settings_and_takes_any_eos_form():
    model = tiny_model(initializer_range=0.2)
    for temperature, top_p in ((-1.0, 1.0), (float("nan"), 1.0), (1.0, 1.5), (1.0, -0.1)):
        with pytest.raises(ValueError, match="temperature must be >= 0 and top_p in"):
            generate(model, [[5, 6]], 3, [1000], temperature=temperature, top_p=top_p)
    free = generate(model, [[5, 6]], 4, [1000])
    assert generate(model, [[5, 6]], 4, None) == generate(model, [[5, 6]], 4, []) == free
    assert generate(model, [[5, 6]], 4, np.int64(free[0][1])) == [cut_at(free[0], [free[0][1]])]
    assert generate(model, [[5, 6]], 4, free[0][1]) == generate(model, [[5, 6]], 4, torch.tensor([free[0][1]])) \
        == [cut_at(free[0], [free[0][1]])]


def test_left_padded_batch_equals_each_prompt_alone():
    model = tiny_model(initializer_range=0.2)
    prompts = [[5, 17, 3, 99, 42, 7, 8, 9], [11, 12], [64, 65, 66, 67, 1]]
    batch = generate(model, prompts, max_new_tokens=10, eos_ids=[1000], pad_id=0)
    alone = [generate(model, [p], max_new_tokens=10, eos_ids=[1000])[0] for p in prompts]
    assert batch == alone


def test_generation_stops_at_eos_and_returns_new_tokens_only():
    model = tiny_model(initializer_range=0.2)
    prompt = [5, 17, 3]
    free = generate(model, [prompt], max_new_tokens=8, eos_ids=[1000])[0]
    eos = free[3]
    stopped = generate(model, [prompt, prompt + [9]], max_new_tokens=8, eos_ids=[eos, 1001])[0]
    assert stopped == free[:free.index(eos)]


def cut_at(row, eos):
    """A free run's tokens up to (not including) the first of the eos tokens."""
    return row[:next((i for i, tok in enumerate(row) if tok in eos), len(row))]


def test_finished_rows_leave_the_batch_without_changing_the_others():
    model = tiny_model(initializer_range=0.2)
    prompts = [[5, 17, 3], [11, 12], [64, 65, 66, 67, 1], [8, 9, 10, 2], [30], [40, 41, 42, 43, 44, 45]]
    free = generate(model, prompts, max_new_tokens=12, eos_ids=[1000])  # eos never produced
    eos = {free[0][1], free[2][4], free[4][7]}  # rows stop at different steps
    expected = [cut_at(f, eos) for f in free]
    assert len({len(e) for e in expected}) > 2 and max(map(len, expected)) > min(map(len, expected)) + 2
    rows_per_call = []
    hook = model.register_forward_pre_hook(lambda m, args: rows_per_call.append(args[0].shape[0]))
    try:
        got = generate(model, prompts, max_new_tokens=12, eos_ids=sorted(eos))
    finally:
        hook.remove()
    assert got == expected
    assert rows_per_call[0] == len(prompts) and min(rows_per_call) < len(prompts)  # the batch did shrink
    assert rows_per_call == sorted(rows_per_call, reverse=True)


def test_seeded_sampling_does_not_depend_on_when_other_rows_stop():
    model = tiny_model(initializer_range=0.2)
    prompts = [[5, 17, 3], [11, 12], [64, 65, 66, 67, 1], [8, 9, 10, 2]]

    def sample(eos):
        return generate(model, prompts, 10, eos, temperature=1.5, generator=torch.Generator().manual_seed(1))

    free = sample([1000])
    eos = {free[0][1], free[2][5]}
    assert sample(sorted(eos)) == [cut_at(f, eos) for f in free]


def test_greedy_matches_transformers_generate(tmp_path):
    hf, out = make_hf_model(tmp_path, "gqa_tied")
    ours = load_model(out)
    prompt = [3, 4, 5, 6, 7]
    ref = hf.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, eos_token_id=None,
                      pad_token_id=0, min_new_tokens=10)[0, len(prompt):].tolist()
    assert generate(ours, [prompt], max_new_tokens=10, eos_ids=[1000]) == [ref]


def test_sampling_top_p_keeps_only_the_nucleus():
    model = tiny_model(initializer_range=0.2)
    prompt = [5, 17, 3]
    greedy = generate(model, [prompt], max_new_tokens=5, eos_ids=[1000])
    g = torch.Generator().manual_seed(0)
    # a nucleus smaller than the top token's probability holds the top token alone
    assert generate(model, [prompt], 5, [1000], temperature=1.0, top_p=1e-6, generator=g) == greedy
    assert generate(model, [prompt], 5, [1000], temperature=1.0, top_p=0.0, generator=g) == greedy
    s1 = generate(model, [prompt] * 4, 5, [1000], temperature=1.5, generator=torch.Generator().manual_seed(3))
    s2 = generate(model, [prompt] * 4, 5, [1000], temperature=1.5, generator=torch.Generator().manual_seed(3))
    assert s1 == s2 and len({tuple(x) for x in s1}) > 1


def test_nucleus_keeps_the_token_that_crosses_top_p():
    """sample_next with p = [0.5, 0.3, 0.2] and top_p = 0.6: the nucleus is the smallest set of top tokens whose
    mass reaches top_p, {0, 1} (0.8), so token 1, which crosses 0.6, is kept and token 2 is never drawn. 40,000
    seeded draws: frequencies within 5 standard deviations of the renormalised [0.625, 0.375, 0]."""
    n = 40_000
    logits = torch.tensor([0.5, 0.3, 0.2]).log().repeat(n, 1)  # (n, V)
    y = sample_next(logits, temperature=1.0, top_p=0.6, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(y, minlength=3).double() / n
    want = torch.tensor([0.625, 0.375, 0.0], dtype=torch.float64)
    sigma = (want * (1 - want) / n).sqrt()
    assert freq[2] == 0 and torch.all((freq - want).abs() <= 5 * sigma), (freq, want)
    # top_p = 1 keeps every token, and a top_p below the top token's mass keeps it alone
    everything = torch.bincount(sample_next(logits, 1.0, 1.0, torch.Generator().manual_seed(1)), minlength=3)
    assert torch.all(everything > 0) and torch.all(sample_next(logits, 1.0, 0.4) == 0)


@pytest.mark.parametrize("held", [["config.json"], ["model.safetensors.index.json", "model-00001-of-00002.safetensors"],
                                  ["pytorch_model.bin"], ["tokenizer.json"]])
def test_save_model_refuses_a_directory_holding_a_checkpoint(tmp_path, held):
    """Without overwrite nothing there is replaced: a sharded checkpoint's config.json, or a new model.safetensors
    beside its shards (which every loader would then prefer), would lose the user's model."""
    out, src = tmp_path / "ck", tmp_path / "src"
    out.mkdir(), src.mkdir()
    (src / "tokenizer.json").write_text("{}")
    for name in held:
        (out / name).write_text("theirs")
    with pytest.raises(ValueError, match=re.escape(f"{out}: already holds {', '.join(sorted(held))}; refusing to overwrite")):
        save_model(tiny_model(), out, tokenizer_from=src)
    assert sorted(p.name for p in out.iterdir()) == sorted(held)
    assert all((out / name).read_text() == "theirs" for name in held)
    save_model(tiny_model(), tmp_path / "new", tokenizer_from=src)  # an empty or new directory is fine
    save_model(tiny_model(), out, tokenizer_from=src, overwrite=True)
    assert (out / "config.json").exists() and (out / "tokenizer.json").read_text() == "{}"


def test_save_model_loads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = tiny_model(tie_word_embeddings=True)
    save_model(model, tmp_path / "ck")
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "ck").eval()
    ids = torch.randint(0, 128, (1, 20))
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)).abs().max() < 1e-4
    with pytest.raises(ValueError, match="refusing to overwrite"):
        save_model(model, tmp_path / "ck")


# ----------------------------------------------------------------------------- bad input

@pytest.fixture
def saved(tmp_path):
    model = tiny_model()
    save_model(model, tmp_path / "ck")
    return tmp_path / "ck"


def test_missing_config(saved):
    (saved / "config.json").unlink()
    with pytest.raises(ValueError, match=r"config.json: not found \(a Hugging Face config.json"):
        load_model(saved)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="no model.safetensors"):
        load_model(tmp_path)


def test_truncated_checkpoint_is_named(saved):
    """A download cut short: a ValueError naming the file (safetensors' own error names nothing)."""
    st = saved / "model.safetensors"
    st.write_bytes(st.read_bytes()[:1000])
    with pytest.raises(ValueError, match=f"^{re.escape(str(st))}: not a readable safetensors file"):
        load_model(saved)


@pytest.mark.parametrize("change, message", [
    ("drop", r"missing tensors \['model.layers.1.mlp.up_proj.weight'\]"),
    ("extra", r"unexpected tensors \['model.layers.9.mlp.up_proj.weight'\]"),
    ("shape", r"tensor model.layers.1.mlp.up_proj.weight has shape \(96, 32\)"),
    ("dtype", r"tensor model.layers.1.mlp.up_proj.weight has dtype torch.int64"),
])
def test_bad_tensors_are_named(saved, change, message):
    f = saved / "model.safetensors"
    sd = load_file(f)
    key = "model.layers.1.mlp.up_proj.weight"
    if change == "drop":
        del sd[key]
    elif change == "extra":
        sd["model.layers.9.mlp.up_proj.weight"] = sd[key].clone()
    elif change == "shape":
        sd[key] = sd[key][:, :32].contiguous()
    else:
        sd[key] = sd[key].long()
    save_file(sd, f)
    before = f.read_bytes()
    with pytest.raises(ValueError, match=message):
        load_model(saved)
    assert f.read_bytes() == before  # nothing the user had is touched


@pytest.mark.parametrize("field, value, message", [
    ("hidden_act", "gelu", "'hidden_act' = 'gelu' is not supported"),
    ("rope_scaling", {"rope_type": "yarn", "factor": 4.0}, "'rope_type' = 'yarn' is not supported"),
    ("rope_scaling", {"type": "dynamic", "factor": 4.0}, "'rope_type' = 'dynamic' is not supported"),
    ("attention_bias", True, "'attention_bias' = True is not supported"),
    ("model_type", "gpt2", "'model_type' = 'gpt2' is not supported"),
    ("attention_dropout", 0.1, "'attention_dropout' = 0.1 is not supported"),
    # shapes the model cannot have: ValueErrors naming the field (they were asserts without the file)
    ("num_key_value_heads", 3, "'num_attention_heads' = 4 is not a multiple of 'num_key_value_heads' = 3"),
    ("head_dim", 7, "'head_dim' = 7 is odd"),
    ("num_key_value_heads", 0, "'num_key_value_heads' = 0: expected a positive integer"),
    ("hidden_size", 0, "'hidden_size' = 0: expected a positive integer"),
    ("hidden_size", None, r"'hidden_size' is missing \(or null\)"),
])
def test_unsupported_config_is_refused(saved, field, value, message):
    cfg = json.loads((saved / "config.json").read_text())
    cfg[field] = value
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=f"^{re.escape(str(saved / 'config.json'))}: .*{message}"):
        load_model(saved)


def test_no_head_dim_needs_divisible_hidden_size():
    with pytest.raises(ValueError, match="'hidden_size' = 66 is not a multiple of 'num_attention_heads' = 4"):
        ModelConfig(hidden_size=66, num_attention_heads=4)
    assert ModelConfig(hidden_size=66, num_attention_heads=4, head_dim=16).head_dim == 16


def test_rope_parameters_form_is_read(saved):
    cfg = json.loads((saved / "config.json").read_text())
    del cfg["rope_theta"], cfg["rope_scaling"]
    cfg["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 500000.0, **{k: v for k, v in LLAMA3_SCALING.items() if k != "rope_type"}}
    (saved / "config.json").write_text(json.dumps(cfg))
    got = ModelConfig.from_hf(saved)
    assert got.rope_theta == 500000.0 and got.rope_scaling["factor"] == 8.0


def test_missing_shard_is_named(tmp_path):
    _, out = make_hf_model(tmp_path, "gqa_tied", shard=True)
    shard = sorted(out.glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(ValueError, match=f"shard {shard.name}"):
        load_model(out)

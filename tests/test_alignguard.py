"""alignguard.py against independent references: brute-force Fisher, dense matrices, gradcheck, PEFT.

    python -m pytest tests/test_alignguard.py -q
"""

import copy
import math
from dataclasses import replace
import json
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.utils._python_dispatch import TorchDispatchMode

import alignguard
from alignguard import (AlignGuardConfig, FisherBasis, LoRAConfig, _categorical, _inverse_cdf, add_lora, delta_weight,
                        dense_split, diag_fisher, disable_lora, e_rm, eig_topk, estimate_fisher, ewc_penalty, kfac_factors, l2_penalty,
                        load_adapter, load_diag_fisher, load_fisher, lora_modules, lora_parameters, lora_split, merge_lora,
                        merged_lora, merged_state_dict, module_penalties, penalties, save_adapter, save_diag_fisher, save_fisher,
                        unmerge_lora, weight_probe)

f64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These matrices are tiny: one thread is fastest and does not fight other jobs for the cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def mlp(d=8, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(OrderedDict(q_proj=nn.Linear(d, d), act=nn.Tanh(), o_proj=nn.Linear(d, d, bias=False),
                                     lm_head=nn.Linear(d, 5)))


def randomize_B(model, seed=1, std=0.5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.copy_(std * torch.randn(m.lora_B.weight.shape, generator=g))


def orthonormal(d, k, seed=0, dtype=f64):
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(d, k, generator=g, dtype=dtype))[0]


def random_basis(d_out, d_in, k, seed=0, dtype=f64):
    g = torch.Generator().manual_seed(seed + 100)
    return FisherBasis(orthonormal(d_out, k, seed, dtype), torch.rand(k, generator=g, dtype=dtype),
                       orthonormal(d_in, k, seed + 1, dtype), torch.rand(k, generator=g, dtype=dtype), 1, 1.0)


def parts(fb):
    return fb.U_g, fb.g, fb.U_a, fb.a


def causal_mean(h):
    return h.cumsum(1) / torch.arange(1, h.shape[1] + 1, dtype=h.dtype)[None, :, None]  # (B, T, h)


class Tiny(nn.Module):
    """Embedding, two Linear layers with a causal mixing step between them, output head."""

    def __init__(self, V=11, d=6, h=5):
        super().__init__()
        self.emb, self.lm_head = nn.Embedding(V, d), nn.Linear(d, V)
        self.up, self.down = nn.Linear(d, h), nn.Linear(h, d)

    def forward(self, ids):
        x = self.emb(ids)
        return self.lm_head(x + self.down(causal_mean(torch.tanh(self.up(x)))))


def tiny_by_hand(model, ids):
    """Tiny's forward written out, the outputs of up and down exposed: {name: (input, output)}."""
    x = model.emb(ids).detach()
    u = F.linear(x, model.up.weight, model.up.bias).detach().requires_grad_()
    h = causal_mean(torch.tanh(u))
    v = F.linear(h, model.down.weight, model.down.bias)
    return model.lm_head(x + v), {"up": (x, u), "down": (h, v)}


def tiny_batches(V=11):
    g = torch.Generator().manual_seed(3)
    out = []
    for B, T in ((2, 5), (3, 4)):
        ids = torch.randint(0, V, (B, T), generator=g)
        labels = torch.randint(0, V, (B, T), generator=g)
        labels[:, :2] = -100  # prompt positions
        labels[0, -1] = -100  # padding
        out.append({"input_ids": ids, "labels": labels})
    out[1]["labels"][2] = -100  # an example without any loss token
    return out


def tiny(seed=0):
    torch.manual_seed(seed)
    return Tiny().double()


# ----------------------------------------------------------------------------------------------------------------
# LoRA


def test_b_zero_gives_base_output_and_disable_restores_it():
    base = mlp()
    model = copy.deepcopy(base)
    assert add_lora(model, LoRAConfig(r=4, targets=("q_proj", "o_proj"))) == ["q_proj", "o_proj"]
    x = torch.randn(3, 8)
    assert torch.equal(model(x), base(x))
    assert set(base.state_dict()) < set(model.state_dict())  # base keys unchanged, lora keys added
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "q_proj.lora_A.weight", "q_proj.lora_B.weight", "o_proj.lora_A.weight", "o_proj.lora_B.weight"}
    assert model.q_proj.lora_A.weight.shape == (4, 8) and model.q_proj.lora_B.weight.shape == (8, 4)
    randomize_B(model)
    assert not torch.allclose(model(x), base(x))
    with disable_lora(model):
        assert torch.equal(model(x), base(x))
    assert not torch.allclose(model(x), base(x))


def test_merge_equals_unmerged_and_round_trips():
    base = mlp()
    model = copy.deepcopy(base)
    cfg = LoRAConfig(r=4, alpha=8.0, targets=("q_proj", "o_proj"))
    add_lora(model, cfg)
    randomize_B(model)
    x = torch.randn(3, 8)
    y = model(x)
    W_q = base.q_proj.weight + 2.0 * model.q_proj.lora_B.weight @ model.q_proj.lora_A.weight  # s = 8/4
    sd = merged_state_dict(model)
    assert set(sd) == set(base.state_dict())
    torch.testing.assert_close(sd["q_proj.weight"], W_q)
    assert torch.equal(model.q_proj.weight, base.q_proj.weight), "merged_state_dict changed the model"
    fresh = copy.deepcopy(base)
    fresh.load_state_dict(sd)
    torch.testing.assert_close(fresh(x), y)

    merge_lora(model)
    torch.testing.assert_close(model.q_proj.merged_weight, W_q)
    torch.testing.assert_close(model(x), y)
    assert set(model.state_dict()) == set(copy.deepcopy(model).state_dict()) and "q_proj.merged_weight" not in model.state_dict()
    with pytest.raises(ValueError, match="unmerge"):
        with disable_lora(model):
            pass
    unmerge_lora(model)
    for name in ("q_proj", "o_proj"):  # W0 was never written: the same bits, and the same outputs as before merging
        assert torch.equal(getattr(model, name).weight, getattr(base, name).weight)
    assert torch.equal(model(x), y)
    with disable_lora(model), pytest.raises(ValueError, match="disabled"):
        merge_lora(model)


def tied_lm(seed=0):
    """Our Llama with a tied lm_head, LoRA on q_proj and on lm_head itself, B random."""
    from model import Llama, ModelConfig, init_weights
    model = init_weights(Llama(ModelConfig(tie_word_embeddings=True)), seed).eval()
    add_lora(model, LoRAConfig(r=4, targets=("q_proj", "lm_head")))
    randomize_B(model)
    return model


def test_merging_a_tied_lm_head_keeps_the_embedding(tmp_path):
    """LoRA on a tied lm_head: merging gives lm_head W0 + ΔW and leaves embed_tokens W0, in place and in a
    saved merged checkpoint (written untied, which our loader and transformers read back as the adapted model)."""
    from model import load_model, save_model
    model = tied_lm()
    E0 = model.model.embed_tokens.weight.clone()
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = model(ids)
        merge_lora(model)
        torch.testing.assert_close(model(ids), y)
        unmerge_lora(model)
        assert torch.equal(model.model.embed_tokens.weight, E0) and torch.equal(model(ids), y)
        save_model(model, tmp_path / "merged", state_dict=merged_state_dict(model))
        config = json.loads((tmp_path / "merged" / "config.json").read_text())
        assert config["tie_word_embeddings"] is False and "lm_head.weight" in load_file(tmp_path / "merged" / "model.safetensors")
        torch.testing.assert_close(load_model(tmp_path / "merged").eval()(ids), y)
        transformers = pytest.importorskip("transformers")
        hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
        torch.testing.assert_close(hf(ids).logits, y)
        # without LoRA on lm_head the checkpoint stays tied
        remove = copy.deepcopy(model)
        with disable_lora(remove):
            save_model(remove, tmp_path / "plain", state_dict={k: v for k, v in remove.state_dict().items() if "lora" not in k})
        assert json.loads((tmp_path / "plain" / "config.json").read_text())["tie_word_embeddings"] is True


def test_merged_lora_merges_only_where_it_keeps_delta_w():
    """merged_lora: fp32 modules run W0 + ΔW inside the block (outputs within rounding of the unmerged ones) and come
    back bit for bit after it; disabled modules, a bf16 base and autocast are left unmerged."""
    model = tied_lm()
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = model(ids)
        with merged_lora(model):
            assert all(m.merged for m in lora_modules(model).values())
            y_merged = model(ids)
        assert not any(m.merged for m in lora_modules(model).values()) and torch.equal(model(ids), y)
        torch.testing.assert_close(y_merged, y)
        assert not torch.equal(y_merged, y)  # merged for real: one sum in place of two changes the last bits
        with disable_lora(model), merged_lora(model):
            assert not any(m.merged for m in lora_modules(model).values())
        with torch.autocast("cpu", dtype=torch.bfloat16), merged_lora(model):
            assert not any(m.merged for m in lora_modules(model).values())
        model.to(torch.bfloat16)
        with merged_lora(model):
            assert not any(m.merged for m in lora_modules(model).values())
        merge_lora(model)  # merged already: left merged after the block
        with merged_lora(model):
            pass
        assert all(m.merged for m in lora_modules(model).values())


def test_merged_weights_formed_in_decode_layout_take_its_layout():
    """merged_lora inside model.decode_layout (as eval.score_driftcheck nests them): each merged W0 + ΔW is
    stored like W0 (strides (1, d_out)), and generation gives the tokens of the unmerged adapter."""
    from model import decode_layout, generate
    model, prompts = tied_lm(), [[5, 6, 7, 8], [9, 10]]
    unmerged = generate(model, prompts, 6, [1000])
    with decode_layout(model), merged_lora(model):
        mods = lora_modules(model).values()
        assert all(m.merged_weight.stride() == m.weight.stride() == (1, m.out_features) for m in mods)
        assert generate(model, prompts, 6, [1000]) == unmerged
    assert all(m.weight.is_contiguous() and not m.merged for m in lora_modules(model).values())


def test_bf16_base_keeps_fp32_lora_weights():
    model = mlp().to(torch.bfloat16)
    add_lora(model, LoRAConfig(r=4, targets="all-linear", init="gaussian"))
    randomize_B(model)
    assert all(p.dtype == torch.float32 for p in lora_parameters(model))
    assert model(torch.randn(2, 8, dtype=torch.bfloat16)).dtype == torch.bfloat16
    # under bf16 autocast x is not cast to fp32 first (autocast casts it back for F.linear): bit for bit the same
    m = lora_modules(model)["q_proj"]
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    out = []
    for cast_first in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = m(x) if not cast_first else F.linear(x, m.weight, m.bias) + F.linear(
                m.lora_A(x.float()), m.scaling * m.lora_B.weight).to(torch.bfloat16)
        out.append((y, *torch.autograd.grad(y.float().square().sum(), (m.lora_A.weight, m.lora_B.weight))))
    assert all(torch.equal(a, b) for a, b in zip(*out))
    # with dropout, in training, x is cast first: in bf16 dropout's scale 1/(1-p) would be rounded
    drop = mlp().to(torch.bfloat16)
    add_lora(drop, LoRAConfig(r=4, targets=("q_proj",), dropout=0.1))
    seen = []
    m = lora_modules(drop)["q_proj"]
    m.lora_A.register_forward_pre_hook(lambda mod, args: seen.append(args[0].dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        m.train()(x)
        m.eval()(x)
    assert seen == [torch.float32, torch.bfloat16]


def test_targets_are_exact_suffixes_and_add_lora_twice_errors():
    with pytest.raises(ValueError, match="'proj' matches no"):
        add_lora(mlp(), LoRAConfig(targets=("proj",)))
    model = nn.Sequential(OrderedDict(o_proj=nn.Linear(4, 4), xo_proj=nn.Linear(4, 4), lm_head=nn.Linear(4, 4)))
    assert add_lora(copy.deepcopy(model), LoRAConfig(r=2, targets=("o_proj",))) == ["o_proj"]
    assert add_lora(model, LoRAConfig(r=2, targets="all-linear")) == ["o_proj", "xo_proj"]
    with pytest.raises(ValueError, match="already has LoRA"):
        add_lora(model, LoRAConfig(r=2, targets=("o_proj",)))


# ----------------------------------------------------------------------------------------------------------------
# Fisher


def brute_force_factors(model, batches):
    """Ā, Ḡ by an explicit loop over loss tokens, g_t from autograd on the hand-written forward."""
    ref = {n: [0, 0, 0] for n in ("up", "down")}
    for b in batches:
        logits, io = tiny_by_hand(model, b["input_ids"])
        mask = b["labels"] != -100
        logp = F.log_softmax(logits, -1)
        S = logp[mask].gather(1, b["labels"][mask][:, None]).sum()
        grads = torch.autograd.grad(S, [io["up"][1], io["down"][1]])
        for (n, (x, _)), g in zip(io.items(), grads):
            for i, t in mask.nonzero().tolist():
                ref[n][0] += torch.outer(x[i, t], x[i, t])
                ref[n][1] += torch.outer(g[i, t], g[i, t])
                ref[n][2] += 1
    return {n: (A / N, G / N, N) for n, (A, G, N) in ref.items()}


def test_kfac_factors_equal_token_wise_second_moments():
    base, batches = tiny(), tiny_batches()
    ref = brute_force_factors(base, batches)
    ours = kfac_factors(base, batches, kind="empirical", targets=("up", "down"))
    model = copy.deepcopy(base)  # with LoRA and B != 0: still the Fisher at W0
    add_lora(model, LoRAConfig(r=2, targets=("up", "down")))
    randomize_B(model)
    with_lora = kfac_factors(model, batches, kind="empirical")
    for n in ("up", "down"):
        assert ours[n][2] == with_lora[n][2] == ref[n][2] == 8, (ours[n][2], ref[n][2])
        for i in (0, 1):
            torch.testing.assert_close(ours[n][i], ref[n][i], rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(with_lora[n][i], ref[n][i], rtol=1e-10, atol=1e-12)

    true1 = kfac_factors(base, batches, "true", generator=torch.Generator().manual_seed(0), targets=("up", "down"))
    true2 = kfac_factors(base, batches, "true", generator=torch.Generator().manual_seed(0), targets=("up", "down"))
    torch.testing.assert_close(true1["up"][0], ref["up"][0])  # Ā does not depend on ŷ
    assert torch.equal(true1["up"][1], true2["up"][1]), "true Fisher is not reproducible with a seeded generator"
    assert not torch.allclose(true1["up"][1], ref["up"][1]), "true Fisher did not sample ŷ"

    basis = estimate_fisher(base, batches, k=100, kind="empirical", targets=("up", "down"))
    fb = basis["up"]
    assert fb.U_g.shape == (5, 5) and fb.U_a.shape == (6, 6), "k must clamp to the factor dimensions"
    assert torch.all(fb.g[:-1] >= fb.g[1:]) and torch.all(fb.a[:-1] >= fb.a[1:]), "eigenvalues not descending"
    torch.testing.assert_close(fb.U_g @ torch.diag(fb.g) @ fb.U_g.T, ref["up"][1])
    torch.testing.assert_close(fb.U_a.T @ fb.U_a, torch.eye(6, dtype=f64))
    fb3 = estimate_fisher(base, batches, k=3, kind="empirical", targets=("up", "down"))["up"]
    torch.testing.assert_close(fb3.g, fb.g[:3])


@pytest.mark.parametrize("k", [1, 3, 6])
def test_eig_topk_are_the_top_eigenpairs_of_numpy(k):
    """eig_topk(M, k) for k below the dimension 7 of a PSD M with distinct eigenvalues: the k largest eigenvalues
    of numpy.linalg.eigh, descending, their eigenvectors up to sign, and Uᵀ M U = diag(λ), Uᵀ U = I."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(7, 7, generator=g, dtype=f64)
    M = X @ X.T
    vals, vecs = np.linalg.eigh(M.numpy())  # ascending
    U, lam = eig_topk(M, k)
    assert U.shape == (7, k) and lam.shape == (k,)
    np.testing.assert_allclose(lam.numpy(), vals[::-1][:k], rtol=1e-12)
    ref = vecs[:, ::-1][:, :k]
    np.testing.assert_allclose(np.abs(np.sum(ref * U.numpy(), 0)), np.ones(k), rtol=1e-10)  # |<u_i, v_i>| = 1
    torch.testing.assert_close(U.T @ M @ U, torch.diag(lam), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(U.T @ U, torch.eye(k, dtype=f64), rtol=0, atol=1e-12)


def test_eig_topk_leaves_out_a_factors_null_space():
    """A factor of rank 3 in width 64 (three fp32 tokens, as from a small alignment set): eig_topk(M, 32) keeps
    the 3 directions above 1e-6·λ_max; the other 29 were arbitrary vectors of its null space, with λ ~1e-8 λ_max
    from rounding, that made an update there free of both R_A and R_T."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(3, 64, generator=g)  # (tokens, d)
    M = sum(torch.outer(x, x).double() for x in X)  # fp32 products summed in fp64, as kfac_factors does
    U, lam = eig_topk(M, 32)
    assert U.shape == (64, 3) and lam.shape == (3,)
    vals = np.linalg.eigvalsh(M.numpy())[::-1]
    np.testing.assert_allclose(lam.numpy(), vals[:3], rtol=1e-10)
    assert 0 < vals[3] < 1e-6 * vals[0]  # what is left out is rounding, not a small real eigenvalue
    torch.testing.assert_close(U @ U.T @ X.double().T, X.double().T)  # the kept U spans every token
    U0, lam0 = eig_topk(torch.zeros(5, 5, dtype=f64), 3)  # a zero factor: no direction the data reaches
    assert U0.shape == (5, 0) and lam0.shape == (0,)


def test_a_rank_deficient_fisher_leaves_its_null_space_to_the_trust_region():
    """Tiny's up_proj reads 6-d embeddings of 2 distinct tokens: Ā has rank 2. The basis keeps 2 input directions
    (with a warning naming the factor), and an update that reads an unseen input direction lies in ΔW_T: R_T is
    its whole ||ΔW||², where the null eigenvectors took it into ΔW_A, penalised by neither term."""
    base = tiny()
    ids = torch.tensor([[1, 2, 1, 2, 1, 2]])
    batch = {"input_ids": ids, "labels": torch.tensor([[-100, 2, 1, 2, 1, 2]])}
    with pytest.warns(UserWarning, match=r"fewer than k = 4 eigenvalues .*up Ā 2"):
        basis = estimate_fisher(base, [batch], k=4, kind="empirical", targets=("up",))
    # full-rank factors (tiny_batches' 11 tokens) and k above their width: the basis is the whole space
    with pytest.warns(UserWarning, match=r"2 Fisher factors keep every direction of their side \(k = 50 .*: up Ḡ \d+, up Ā 6"):
        whole = estimate_fisher(base, tiny_batches(), k=50, kind="empirical", targets=("up",))["up"]
    assert whole.U_a.shape == (6, 6)
    fb = basis["up"]
    assert fb.U_a.shape == (6, 2) and fb.U_g.shape[1] <= 4
    x = base.emb.weight[[1, 2]].detach()  # (2, 6): the only inputs up_proj saw
    torch.testing.assert_close(fb.U_a @ fb.U_a.T @ x.T, x.T)
    v = torch.linalg.svd(x, full_matrices=True).Vh[-1]  # (6,) orthogonal to both inputs
    A, B = v[None, :], fb.U_g[:, :1] * 3.0  # ΔW = 3 u_g,1 vᵀ, ||ΔW||² = 9
    t = module_penalties(A, B, 1.0, fb.U_g, fb.g, fb.U_a, fb.a)
    assert t["R_T"].item() == pytest.approx(9.0, rel=1e-9) and t["R_A"].item() == pytest.approx(0.0, abs=1e-20)


def test_categorical_draws_follow_the_rows_probabilities():
    """alignguard._categorical (the true Fisher's ŷ ~ p) against p itself: 100,000 draws per row, frequencies
    within 5 standard deviations of p / Σp, zero-probability tokens never drawn, mass at either end found."""
    p = torch.tensor([[0.1, 0.0, 0.3, 0.2, 0.0, 0.25, 0.15],
                      [2.0, 1.0, 0.0, 0.0, 0.5, 0.0, 0.5],    # not normalised: Σp = 4
                      [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0],
                      [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    n = 100_000
    y = _categorical(p.repeat(n, 1), torch.Generator().manual_seed(0)).view(n, 4)  # draw i of row j at [i, j]
    freq = torch.stack([torch.bincount(y[:, j], minlength=7) for j in range(4)]).double() / n
    want = (p / p.sum(1, keepdim=True)).double()
    sigma = (want * (1 - want) / n).sqrt()
    assert torch.all((freq - want).abs() <= 5 * sigma + 1e-12), (freq, want)
    assert torch.all(freq[want == 0] == 0)
    assert _categorical(torch.rand(0, 300)).shape == (0,)  # a batch without loss tokens


def test_inverse_cdf_is_exact_at_a_large_vocabulary_and_refuses_bad_rows():
    """alignguard._inverse_cdf at u in the middle of a token's interval of the fp64 CDF must return that token:
    a 20,000-token row (padded to its blocks) with masses from 0.3 down to 1e-30; 200 tokens of mass 1e-12 to
    1e-7 (fp64 resolves them, one fp32 running sum over the row does not: it misses most of them) and 200
    larger ones. NaN, inf and massless rows are refused."""
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(8 * torch.randn(1, 20_000, generator=g), -1)
    p[0, ::7] = 0
    c = torch.cat([torch.zeros(1, dtype=f64), p.double().cumsum(-1)[0]])  # c[t] = mass before token t
    small = torch.nonzero((p[0] > 1e-12) & (p[0] < 1e-7)).squeeze(1)
    large = torch.nonzero(p[0] >= 1e-7).squeeze(1)  # (a mass below ~1e-16 is below fp64's resolution of u)
    tokens = torch.cat([small[torch.randperm(len(small), generator=g)[:200]],
                        large[torch.randperm(len(large), generator=g)[:200]]])
    u = (c[tokens] + c[tokens + 1]) / 2 / c[-1]
    assert len(small) >= 200 and len(large) >= 200
    assert torch.equal(_inverse_cdf(p.expand(len(u), -1), u), tokens)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="not finite"):
            _inverse_cdf(torch.tensor([[0.2, bad, 0.3]]), torch.tensor([0.5]))
    with pytest.raises(ValueError, match="sums to 0"):
        _inverse_cdf(torch.zeros(1, 3), torch.tensor([0.5]))


def test_kfac_is_the_exact_fisher_of_one_linear_softmax_layer_and_R_A_is_the_kl():
    d, V = 4, 6
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(d, V, bias=False)).double()
    x = 4 * torch.randn(d, dtype=f64)  # p from 0.07 to 0.39: sampling from another p shows in Ḡ
    forward = lambda m, b: m(x.expand(*b["input_ids"].shape, d))  # (B, T, V), every token reads x
    W0 = model[0].weight.detach()
    p = torch.softmax(W0 @ x, 0)

    F_exact = torch.zeros(V * d, V * d, dtype=f64)  # E_y~p[∇ log p(y) ∇ log p(y)ᵀ], y enumerated
    G_exact, F_kfac, G_sq = 0, 0, 0
    for y in range(V):
        W = W0.clone().requires_grad_()
        (grad,) = torch.autograd.grad(torch.log_softmax(W @ x, 0)[y], W)
        F_exact += p[y] * torch.outer(grad.flatten(), grad.flatten())
        batch = {"input_ids": torch.zeros(1, 1, dtype=torch.long), "labels": torch.tensor([[y]])}
        ((A_bar, G_bar, N),) = kfac_factors(model, [batch], "empirical", forward, targets=("0",)).values()
        F_kfac = F_kfac + p[y] * torch.kron(G_bar, A_bar)
        G_exact = G_exact + p[y] * G_bar
        G_sq = G_sq + p[y] * G_bar.pow(2).sum()  # E_y ||g gᵀ||²
    torch.testing.assert_close(F_kfac, F_exact, rtol=1e-10, atol=1e-14)
    model32, x32 = copy.deepcopy(model).float(), x.float()  # under bf16 autocast Ā stays an fp32 statistic
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ((A_bf16, _, _),) = kfac_factors(model32, [batch], "empirical", lambda m, b: m(x32[None, None]),
                                         targets=("0",)).values()
    torch.testing.assert_close(A_bf16, torch.outer(x32, x32).double(), rtol=1e-6, atol=1e-7)

    # the true Fisher's Ḡ from n draws ŷ ~ p: its error ||Ḡ − E[g gᵀ]|| has RMS σ = √((E||g gᵀ||² − ||E g gᵀ||²) / n),
    # 0.8% of ||Ḡ|| here. 3σ allows the seed's noise (seeds 0-4: 0.8-1.2σ); drawing ŷ from p^1.1 (renormalised)
    # instead puts it 4.4-5.0σ off, from p^1.2 9-10σ
    n = 50_000
    many = {"input_ids": torch.zeros(1, n, dtype=torch.long), "labels": torch.zeros(1, n, dtype=torch.long)}
    ((_, G_true, N),) = kfac_factors(model, [many], "true", forward, torch.Generator().manual_seed(0), ("0",)).values()
    sigma = ((G_sq - G_exact.pow(2).sum()) / n).sqrt()
    err = (G_true - G_exact).norm()
    assert N == n and err < 3 * sigma, f"sampled Ḡ is {err / sigma:.2f} σ from E_y~p[g gᵀ] (σ = {sigma:.2e})"

    dW = 1e-3 * torch.randn(V, d, dtype=f64)
    p1 = torch.softmax((W0 + dW) @ x, 0)
    kl = (p * (p.log() - p1.log())).sum()
    quad = 0.5 * dW.flatten() @ F_exact @ dW.flatten()
    basis = (*eig_topk(G_exact, V), *eig_topk(torch.outer(x, x), d))  # U_g, g, U_a, a
    R_A = module_penalties(torch.eye(d, dtype=f64), dW, 1.0, *basis)["R_A"]  # ΔW = B·A with A = I
    for name, val in (("½ vec(ΔW)ᵀ F vec(ΔW)", quad), ("R_A", R_A)):
        assert abs(val / kl - 1) < 0.01, f"{name} = {val:.4e} vs KL = {kl:.4e}"


def test_diag_fisher_equals_per_example_loop():
    base, batches = tiny(), tiny_batches()
    model = copy.deepcopy(base)
    add_lora(model, LoRAConfig(r=2, targets=("up", "down")))
    randomize_B(model)  # the diagonal Fisher is taken at W0 regardless
    ours = diag_fisher(model, batches)
    ref, M = {"up": 0, "down": 0}, 0
    Ws = [base.up.weight, base.down.weight]
    for b in batches:
        for i in range(b["input_ids"].shape[0]):
            mask = b["labels"][i] != -100
            if not mask.any():
                continue
            logp = F.log_softmax(base(b["input_ids"][i:i + 1])[0], -1)  # (T, V)
            grads = torch.autograd.grad(logp[mask].gather(1, b["labels"][i][mask][:, None]).sum(), Ws)
            ref = {n: ref[n] + g.pow(2) for n, g in zip(ref, grads)}
            M += 1
    assert M == 4
    for n in ref:
        torch.testing.assert_close(ours[n], ref[n] / M, rtol=1e-10, atol=1e-14)


def test_save_load_fisher_refuses_a_basis_made_for_something_else(tmp_path):
    base, batches = tiny(), tiny_batches()
    basis = estimate_fisher(base, batches, k=3, kind="empirical", targets=("up", "down"))
    meta = {"k": 3, "kind": "empirical", "data_hash": "abc"}
    path = tmp_path / "fisher.safetensors"
    save_fisher(path, basis, meta)
    loaded = load_fisher(path, base, expect=meta)
    for n in basis:
        torch.testing.assert_close(loaded[n].U_g, basis[n].U_g.float(), check_dtype=False)
        assert loaded[n].n_tokens == 8
    with pytest.raises(ValueError, match="k=3, expected 4"):
        load_fisher(path, base, expect={**meta, "k": 4})
    with pytest.raises(ValueError, match="shape"):
        torch.manual_seed(0)
        load_fisher(path, Tiny(h=7).double())
    with pytest.raises(ValueError, match="other weights"):
        load_fisher(path, tiny(seed=1))
    adapted = copy.deepcopy(base)
    add_lora(adapted, LoRAConfig(r=2, targets=("up",)))
    with pytest.raises(ValueError, match=r"unknown \['down'\]"):
        load_fisher(path, adapted)
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not an AlignGuard Fisher basis"):
        load_fisher(tmp_path / "other.safetensors")
    # weights of the same norm, other values: up's rows in reverse order (||W0|| alone took them)
    flipped = copy.deepcopy(base)
    with torch.no_grad():
        flipped.up.weight.copy_(flipped.up.weight.flip(0))
    assert abs(flipped.up.weight.norm() - base.up.weight.norm()) < 1e-12
    with pytest.raises(ValueError, match="'up' has .* weight probe .* other weights"):
        load_fisher(path, flipped)
    rounded = copy.deepcopy(base)  # the same weights rounded to bf16 (a --dtype bf16 run) are the same weights
    with torch.no_grad():
        for m in (rounded.up, rounded.down):
            m.weight.copy_(m.weight.bfloat16().double())
    load_fisher(path, rounded)
    # a file is never replaced by a Fisher basis unless it is one
    save_fisher(path, basis, {**meta, "k": 4})
    assert load_fisher(path, base, expect={**meta, "k": 4})
    before = (tmp_path / "other.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="not an AlignGuard Fisher basis; refusing to overwrite"):
        save_fisher(tmp_path / "other.safetensors", basis, meta)
    assert (tmp_path / "other.safetensors").read_bytes() == before


def test_save_load_diag_fisher_checks_meta_shapes_and_the_file(tmp_path):
    """The EWC baseline's cache: a round trip, then each way a file can be wrong names the file and the field
    (a file cut short, as by a kill mid-write before writes became atomic, was a SafetensorError naming nothing)."""
    base, batches = tiny(), tiny_batches()
    f_diag = diag_fisher(base, batches, targets=("up", "down"))
    meta, path = {"data_hash": "abc", "n_align": 4}, tmp_path / "ewc.safetensors"
    save_diag_fisher(path, f_diag, meta)
    loaded = load_diag_fisher(path, base, expect=meta)
    assert set(loaded) == {"up", "down"}
    for n in f_diag:
        torch.testing.assert_close(loaded[n], f_diag[n].float(), check_dtype=False)
    with pytest.raises(ValueError, match="n_align=4, expected 5"):
        load_diag_fisher(path, base, expect={**meta, "n_align": 5})
    torch.manual_seed(0)
    with pytest.raises(ValueError, match=r"'(up|down)' of shape \[\d, \d\] is not a Linear layer of this model of that shape"):
        load_diag_fisher(path, Tiny(h=9).double())
    assert not list(tmp_path.glob("*.tmp*"))  # written through a temporary file, renamed when complete
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[:50])
    with pytest.raises(ValueError, match="cut.safetensors: not a readable safetensors file"):
        load_diag_fisher(cut)
    # a file without the meta (as train.py wrote before it kept any) could hold anything: refused
    legacy = tmp_path / "legacy.safetensors"
    save_file({n: F_.float().contiguous() for n, F_ in f_diag.items()}, str(legacy))
    with pytest.raises(ValueError, match="not an AlignGuard diagonal Fisher: no 'alignguard_diag_fisher' metadata"):
        load_diag_fisher(legacy, base)
    save_fisher(tmp_path / "basis.safetensors", estimate_fisher(base, batches, k=2, kind="empirical",
                                                                targets=("up",)), meta)
    with pytest.raises(ValueError, match="not an AlignGuard diagonal Fisher: no 'alignguard_diag_fisher' metadata"):
        load_diag_fisher(tmp_path / "basis.safetensors")
    before = (tmp_path / "basis.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="not an AlignGuard diagonal Fisher; refusing to overwrite"):
        save_diag_fisher(tmp_path / "basis.safetensors", f_diag, meta)
    assert (tmp_path / "basis.safetensors").read_bytes() == before


@pytest.mark.parametrize("theta", [0.03, 0.3])
def test_load_fisher_refuses_weights_whose_probe_alone_moved(tmp_path, theta):
    """up's W0 rotated by θ towards a W⊥ of the same norm (<W⊥, W0> = 0): ||W0|| is unchanged, so only the weight
    probe tells the weights apart; θ = 0.03 and 0.3 move it by 4% and 37% relative: other weights, far past
    bf16 rounding (0.1-0.2%) and under the 70-160% of unrelated weights."""
    base, batches = tiny(), tiny_batches()
    path = tmp_path / "fisher.safetensors"
    save_fisher(path, estimate_fisher(base, batches, k=3, kind="empirical", targets=("up", "down")), {})
    W0 = base.up.weight.detach().clone()
    R = torch.randn(W0.shape, generator=torch.Generator().manual_seed(5), dtype=f64)
    W_perp = R - (R * W0).sum() / W0.pow(2).sum() * W0
    W_perp *= W0.norm() / W_perp.norm()
    moved = copy.deepcopy(base)
    with torch.no_grad():
        moved.up.weight.copy_(math.cos(theta) * W0 + math.sin(theta) * W_perp)
    probe_off = ((weight_probe(moved.up.weight) - weight_probe(W0)).norm() / weight_probe(W0).norm()).item()
    assert abs(moved.up.weight.norm() / W0.norm() - 1) < 1e-12 and 0.02 < probe_off < 0.5, probe_off
    with pytest.raises(ValueError, match="'up' has .* weight probe .* other weights"):
        load_fisher(path, moved)


def test_load_fisher_refuses_weights_whose_norm_alone_moved(tmp_path):
    """W0 scaled by 1.005 moves the weight probe by 0.5% (under its 1% limit, which rounding to bf16 needs) and
    ||W0|| by 0.5%, over its 0.1% limit: only the norm check refuses it. A scale of 1.0005 passes both."""
    base, batches = tiny(), tiny_batches()
    path = tmp_path / "fisher.safetensors"
    save_fisher(path, estimate_fisher(base, batches, k=3, kind="empirical", targets=("up", "down")), {})
    for scale, refused in ((1.005, True), (1.0005, False)):
        scaled = copy.deepcopy(base)
        with torch.no_grad():
            scaled.up.weight.mul_(scale)
        if refused:
            with pytest.raises(ValueError, match="'up' has .* other weights"):
                load_fisher(path, scaled)
        else:
            load_fisher(path, scaled)


# ----------------------------------------------------------------------------------------------------------------
# Split and penalties


def dense_terms(dW, U_g, g, U_a, a, beta, eps):
    """Every term from (d_out, d_in) matrices and the literal definitions of DESIGN 3.2-3.3."""
    P_g, P_a = U_g @ U_g.T, U_a @ U_a.T
    dW_A = P_g @ dW @ P_a
    dW_T = dW - dW_A
    G_k, A_k = U_g @ torch.diag(g) @ U_g.T, U_a @ torch.diag(a) @ U_a.T
    tau = dW.pow(2).mean().sqrt()
    rho = 1 + beta * torch.sigmoid((dW.abs() - tau) / tau)
    nA, nT = dW_A.pow(2).sum(), dW_T.pow(2).sum()
    return {
        "R_A": 0.5 * dW_A.flatten() @ torch.kron(G_k, A_k) @ dW_A.flatten(),
        "R_T": nT,
        "E_geo": 0.5 * ((dW_A.T @ dW_T).pow(2).sum() + (dW_A @ dW_T.T).pow(2).sum()) / (nA * nT + eps),
        "E_rm": (rho * (dW_A * dW_T).abs()).sum() / ((rho * (dW_A**2 + dW_T**2) / 2).sum() + eps),
        "cos_literal": (dW_A * dW_T).sum() ** 2 / (nA * nT + eps),
    }, dW_A, dW_T


def test_factored_split_and_terms_equal_dense_versions():
    torch.manual_seed(0)
    d_out, d_in, r, s = 7, 9, 3, 1.7
    A, B = torch.randn(r, d_in, dtype=f64), torch.randn(d_out, r, dtype=f64)
    fb = FisherBasis(orthonormal(d_out, 4), torch.rand(4, dtype=f64), orthonormal(d_in, 3, 1), torch.rand(3, dtype=f64),
                     1, 1.0)  # k_g = 4, k_a = 3: C is rectangular
    dW = s * B @ A
    ref, dW_A, dW_T = dense_terms(dW, fb.U_g, fb.g, fb.U_a, fb.a, beta=2.0, eps=0.0)

    C, P, Q, B_perp, A_perp, dWT_sq = lora_split(A, B, s, fb.U_g, fb.U_a)
    X, Y = s * P @ A_perp, s * B_perp @ Q
    torch.testing.assert_close(C, fb.U_g.T @ dW @ fb.U_a)
    torch.testing.assert_close(X, fb.U_g.T @ dW_T)
    torch.testing.assert_close(Y, dW_T @ fb.U_a)
    torch.testing.assert_close(dWT_sq, dW.pow(2).sum() - C.pow(2).sum())
    torch.testing.assert_close(C.pow(2).sum(), dW_A.pow(2).sum())
    ours = dense_split(A, B, s, fb.U_g, fb.U_a)
    for got, want in zip(ours, (dW, dW_A, dW_T)):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(ours[1] + ours[2], dW)
    torch.testing.assert_close(fb.U_g @ fb.U_g.T @ dW_A @ fb.U_a @ fb.U_a.T, dW_A)  # P(P ΔW) = P ΔW
    C2, P2, Q2, B2, A2, sq2 = lora_split(fb.U_a.T, fb.U_g @ C, 1.0, fb.U_g, fb.U_a)  # split ΔW_A again, as a LoRA
    X2, Y2 = P2 @ A2, B2 @ Q2
    torch.testing.assert_close(C2, C)
    assert max(X2.abs().max(), Y2.abs().max(), sq2.abs()) < 1e-12, "the split of ΔW_A is not ΔW_A itself"

    terms = module_penalties(A, B, s, *parts(fb), beta=2.0, eps=0.0)
    for name in ("R_A", "R_T", "E_geo", "E_rm"):
        torch.testing.assert_close(terms[name], ref[name], msg=f"{name}: {terms[name]} vs dense {ref[name]}")
    assert 0 < terms["E_geo"] < 1 and 0 < terms["E_rm"] < 1
    assert terms["cos_literal"] < 1e-20 and ref["cos_literal"] < 1e-20, terms["cos_literal"]

    U_g, U_a = fb.U_g + 0.1 * torch.randn(d_out, 4, dtype=f64), fb.U_a  # not orthonormal: cos_literal sees it
    C_lit = U_g.T @ dW @ U_a
    dW_A = U_g @ C_lit @ U_a.T
    cos = (dW_A * (dW - dW_A)).sum() ** 2 / (dW_A.pow(2).sum() * (dW - dW_A).pow(2).sum())
    got = module_penalties(A, B, s, U_g, fb.g, U_a, fb.a, eps=0.0)["cos_literal"]
    assert cos > 1e-4
    torch.testing.assert_close(got, cos)


@pytest.mark.parametrize("name", ["R_A", "R_T", "E_geo", "E_rm"])
def test_gradcheck_penalty_terms(name):
    torch.manual_seed(1)
    A = torch.randn(3, 6, dtype=f64, requires_grad=True)
    B = torch.randn(5, 3, dtype=f64, requires_grad=True)
    fb = random_basis(5, 6, 2)
    beta = 0.0 if name == "E_rm" else 1.0  # ρ is held constant in backward; with β = 0 it is constant
    assert torch.autograd.gradcheck(lambda A, B: module_penalties(A, B, 1.3, *parts(fb), beta)[name], (A, B))


def test_e_rm_gradient_treats_rho_as_a_constant():
    torch.manual_seed(2)
    A = torch.randn(3, 6, dtype=f64, requires_grad=True)
    B = torch.randn(5, 3, dtype=f64, requires_grad=True)
    fb = random_basis(5, 6, 2)
    ours = torch.autograd.grad(module_penalties(A, B, 1.3, *parts(fb), beta=2.0, eps=0.0)["E_rm"], (A, B))
    dW = 1.3 * B @ A
    dW_A = fb.U_g @ fb.U_g.T @ dW @ fb.U_a @ fb.U_a.T
    dW_T = dW - dW_A
    with torch.no_grad():  # ρ is a constant weight (DESIGN 3.3)
        tau = dW.pow(2).mean().sqrt()
        rho = 1 + 2.0 * torch.sigmoid((dW.abs() - tau) / tau)
    ref = (rho * (dW_A * dW_T).abs()).sum() / ((rho * (dW_A**2 + dW_T**2) / 2).sum())
    for got, want in zip(ours, torch.autograd.grad(ref, (A, B))):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("s", [1.7, -1.7])
def test_e_rm_of_a_stack_equals_each_module_by_autograd(s):
    """e_rm on a stack (L, ..) of three modules, value and gradient of Σ_l w_l E_rm,l, against the dense
    formula differentiated by autograd one module at a time (ρ constant), k_g != k_a; a negative scaling
    (lora_alpha < 0) too."""
    torch.manual_seed(3)
    L, d_out, d_in, r, beta = 3, 7, 9, 2, 1.5
    A = torch.randn(L, r, d_in, dtype=f64, requires_grad=True)
    B = torch.randn(L, d_out, r, dtype=f64, requires_grad=True)
    U_g = torch.stack([orthonormal(d_out, 3, i) for i in range(L)])
    U_a = torch.stack([orthonormal(d_in, 4, 10 + i) for i in range(L)])
    w = torch.tensor([1.0, -2.0, 0.5], dtype=f64)
    E = e_rm(A, B, s, U_g, U_a, beta, eps=0.0)
    got = torch.autograd.grad((w * E).sum(), (A, B))
    ref = []
    for l in range(L):
        dW = s * B[l] @ A[l]
        dW_A = U_g[l] @ U_g[l].T @ dW @ U_a[l] @ U_a[l].T
        dW_T = dW - dW_A
        with torch.no_grad():
            tau = dW.pow(2).mean().sqrt()
            rho = 1 + beta * torch.sigmoid((dW.abs() - tau) / tau)
        ref.append((rho * (dW_A * dW_T).abs()).sum() / ((rho * (dW_A**2 + dW_T**2) / 2).sum()))
    ref = torch.stack(ref)
    torch.testing.assert_close(E.detach(), ref.detach())
    for g, want in zip(got, torch.autograd.grad((w * ref).sum(), (A, B))):
        torch.testing.assert_close(g, want)


def test_e_rm_of_a_module_at_b_zero_inside_a_stack():
    """A module still at B = 0 (its first step) inside a stack: E_rm = 0 with a finite gradient for it, and
    the other modules get the values and gradients they get without it; β < 0 is refused. fp32 and s = 4:
    s / τ at τ = finfo.tiny overflows there, so the code must divide s·B by τ, not multiply B by s / τ."""
    torch.manual_seed(4)
    L, d_out, d_in, r, s = 3, 6, 8, 2, 4.0
    A = torch.randn(L, r, d_in)
    B = torch.randn(L, d_out, r)
    B[1] = 0
    U_g = torch.stack([orthonormal(d_out, 3, i).float() for i in range(L)])
    U_a = torch.stack([orthonormal(d_in, 2, 10 + i).float() for i in range(L)])
    A.requires_grad_(), B.requires_grad_()
    E = e_rm(A, B, s, U_g, U_a, 1.0, eps=1e-8)
    gA, gB = torch.autograd.grad(E.sum(), (A, B))
    assert E[1] == 0 and torch.isfinite(gA).all() and torch.isfinite(gB).all()
    keep = [0, 2]
    E2 = e_rm(A[keep], B[keep], s, U_g[keep], U_a[keep], 1.0, eps=1e-8)
    gA2, gB2 = torch.autograd.grad(E2.sum(), (A, B))
    torch.testing.assert_close(E[keep], E2)
    torch.testing.assert_close(gA[keep], gA2[keep])
    torch.testing.assert_close(gB[keep], gB2[keep])
    with pytest.raises(ValueError, match="beta"):
        e_rm(A, B, s, U_g, U_a, -0.5, eps=1e-8)


def test_e_rm_buffers_kept_between_calls_leave_no_trace(monkeypatch):
    """e_rm's dense matrices are views of one buffer kept from call to call on a CPU (alignguard._rm_buffers):
    a call after others of larger and smaller shapes, fp32 and fp64, gives the same value and gradients bit for
    bit, and what an earlier call returned is not changed by later ones (nothing returned aliases the buffer)."""
    def call(L, d_out, d_in, dtype, seed):
        g = torch.Generator().manual_seed(seed)
        A = torch.randn(L, 2, d_in, generator=g, dtype=dtype, requires_grad=True)
        B = torch.randn(L, d_out, 2, generator=g, dtype=dtype, requires_grad=True)
        U_g = torch.stack([orthonormal(d_out, 3, seed + i).to(dtype) for i in range(L)])
        U_a = torch.stack([orthonormal(d_in, 3, seed + 10 + i).to(dtype) for i in range(L)])
        E = e_rm(A, B, 1.5, U_g, U_a, 1.0, eps=1e-8)
        return (E.detach(), *torch.autograd.grad(E.sum(), (A, B)))

    alignguard.release_rm_buffers()  # what earlier tests left
    first = call(2, 6, 5, torch.float32, 0)
    kept = [t.clone() for t in first]
    call(3, 9, 11, torch.float32, 1)  # grows the buffer
    call(1, 4, 3, torch.float32, 2)
    call(2, 6, 5, torch.float64, 3)  # another dtype
    for a, b, c in zip(first, kept, call(2, 6, 5, torch.float32, 0)):
        assert torch.equal(a, b) and torch.equal(a, c)
    # one buffer per dtype, five matrices of the largest stack asked for; release_rm_buffers frees them
    sizes = {dtype: t.numel() for (_, dtype), t in alignguard._RM_WORKSPACE.items()}
    assert sizes[torch.float32] == 5 * 3 * 9 * 11 and sizes[torch.float64] == 5 * 2 * 6 * 5
    alignguard.release_rm_buffers()
    assert not alignguard._RM_WORKSPACE
    # a chunk above _RM_KEEP entries gets fresh tensors and leaves the kept buffer as it was
    monkeypatch.setattr(alignguard, "_RM_KEEP", 5 * 2 * 6 * 5)
    call(2, 6, 5, torch.float32, 0)  # kept
    call(3, 9, 11, torch.float32, 1)  # above the limit
    assert {k[1]: t.numel() for k, t in alignguard._RM_WORKSPACE.items()} == {torch.float32: 5 * 2 * 6 * 5}
    assert all(torch.equal(a, b) for a, b in zip(first, call(2, 6, 5, torch.float32, 0)))
    alignguard.release_rm_buffers()


def lora_stack(shapes, r=4, k=4):
    """A Sequential of bias-free Linear layers (d_in, d_out), LoRA on all, B != 0, a random basis each."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(d_in, d_out, bias=False) for d_in, d_out in shapes])
    add_lora(model, LoRAConfig(r=r, targets="all-linear"))
    randomize_B(model, std=0.02)
    basis = {name: random_basis(m.out_features, m.in_features, k, seed=i, dtype=torch.float32)
             for i, (name, m) in enumerate(lora_modules(model).items())}
    return model, basis


def test_compiled_e_rm_equals_eager():
    """AlignGuardConfig(compile_rm=True): the same penalty and gradients through torch.compile."""
    model, basis = lora_stack([(48, 32), (48, 32), (32, 48)])
    cfg = AlignGuardConfig(lambda_a=0.0, lambda_t=0.0, lambda_nc=1.0, alpha=1.0)
    out = []
    for compile_rm in (False, True):
        total, _ = penalties(model, basis, replace(cfg, compile_rm=compile_rm))
        grads = torch.autograd.grad(total, lora_parameters(model))
        out.append((total.detach(), grads))
    torch.testing.assert_close(out[0][0], out[1][0], rtol=1e-5, atol=1e-7)
    for a, b in zip(out[0][1], out[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_saved_for_backward_does_not_grow_with_modules_beyond_factored_terms():
    d = 512

    def saved_bytes(n):
        model, basis = lora_stack([(d, d)] * n)
        storages = {}

        def pack(t):  # a tensor saved by several ops, or a view, holds its memory once
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            reg, terms = penalties(model, basis, AlignGuardConfig(lambda_nc=1.0, alpha=0.5))
        reg.backward()
        assert all(p.grad is not None for p in lora_parameters(model))
        return sum(storages.values())

    growth, dense = saved_bytes(8) - saved_bytes(2), 6 * d * d * 4
    assert growth < dense / 10, f"saved-for-backward grew by {growth} bytes for 6 modules; one ΔW each is {dense}"


class OutputSizes(TorchDispatchMode):
    """While active: the entries of the largest tensor any op returns, and the entries all ops return."""
    def __init__(self):
        super().__init__()
        self.largest = self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest, self.total = max(self.largest, t.numel()), self.total + t.numel()
        return out


def test_factored_terms_cost_grows_linearly_in_width_and_e_rm_quadratically():
    """Issue 7: the overhead must stay linear in d, not d², except for E_rm. Counted, not timed: the matmul FLOPs
    (torch's FlopCounterMode) and the largest tensor any op makes, forward and backward, of the terms of a stack
    of two d x d modules (r 8, k 32), through penalties() as training calls it, once with E_rm replaced by zero and
    once with it."""
    from torch.utils.flop_counter import FlopCounterMode

    def cost(d, rm_fn):
        alignguard.release_rm_buffers()  # E_rm's kept buffer is then allocated inside the count, whatever ran before
        model, basis = lora_stack([(d, d)] * 2, r=8, k=32)
        sizes = OutputSizes()
        with pytest.MonkeyPatch.context() as mp, FlopCounterMode(display=False) as flops, sizes:
            mp.setattr(alignguard, "e_rm_value_and_grads", rm_fn)  # penalties looks it up when it runs
            # rm_chunk: both modules of the widest stack in one E_rm call, whatever the default
            penalties(model, basis, AlignGuardConfig(lambda_nc=1.0, alpha=0.5, rm_chunk=2 * 1024**2))[0].backward()
        assert all(p.grad is not None for p in lora_parameters(model))  # the backward reached the factors
        return flops.get_total_flops(), sizes.largest

    def no_rm(A, B, *args, **kw):
        return A.new_zeros(A.shape[:-2]), torch.zeros_like(A), torch.zeros_like(B)

    widths = (256, 512, 1024)
    factored = [cost(d, no_rm) for d in widths]
    rm = [cost(d, alignguard.e_rm_value_and_grads) for d in widths]
    alignguard.release_rm_buffers()
    for (f0, _), (f1, _), d in zip(factored, factored[1:], widths):
        assert 1.5 < f1 / f0 < 2.1, f"factored terms' FLOPs grew {f1 / f0:.2f}x from width {d} to {2 * d}"
    for (_, n), d in zip(factored, widths):
        assert n <= 2 * d * 32, f"a factored term made a tensor of {n} entries at width {d}: more than U_g's"
    assert rm[-1][0] / rm[-2][0] > 3.5 and rm[-1][1] == 5 * 2 * 1024**2  # E_rm's buffer: 5 (d, d) matrices a module


def test_e_rm_in_chunks_gives_the_same_gradients_and_backward_work_linear_in_the_stack():
    """E_rm over a stack one module at a time (rm_chunk of one module) against the whole stack at once: the
    same value and LoRA gradients, and the entries that backward's ops write grow linearly with the number
    of modules L (attaching each chunk's gradient to its slice of the stack would make backward add a
    zero-filled gradient of the whole stack per chunk: L² entries)."""
    def run(L, rm_chunk):
        model, basis = lora_stack([(16, 24)] * L, r=4, k=4)
        total, _ = penalties(model, basis, AlignGuardConfig(lambda_nc=1.0, alpha=1.0, rm_chunk=rm_chunk))
        with OutputSizes() as written:
            total.backward()
        return total.detach(), [p.grad for p in lora_parameters(model)], written.total

    whole, chunked = run(8, 2**21), run(8, 16 * 24)
    torch.testing.assert_close(chunked[0], whole[0])
    for got, want in zip(chunked[1], whole[1]):
        torch.testing.assert_close(got, want)
    n8, n32 = chunked[2], run(32, 16 * 24)[2]
    assert n32 < 5 * n8, f"backward wrote {n8} entries for 8 modules, {n32} for 32: not linear in the stack"


def test_penalties_are_fp32_under_bf16_autocast_and_totals_add_up():
    model, basis = lora_stack([(16, 16), (16, 24), (24, 16), (16, 16), (16, 24)])  # stacks of 2, 2 and 1
    cfg = AlignGuardConfig(lambda_a=10.0, lambda_t=0.5, lambda_nc=2.0, alpha=0.3, beta=1.5)
    F_diag = {n: torch.rand(m.weight.shape) for n, m in lora_modules(model).items()}
    ref, ref_terms = penalties(model, basis, cfg)
    one_at_a_time, _ = penalties(model, basis, AlignGuardConfig(**{**cfg.__dict__, "rm_chunk": 1}))
    torch.testing.assert_close(one_at_a_time, ref)
    ref_l2, ref_ewc = l2_penalty(model), ewc_penalty(model, F_diag)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, terms = penalties(model, basis, cfg)
        l2, ewc = l2_penalty(model), ewc_penalty(model, F_diag)
    for got, want in [(total, ref), (l2, ref_l2), (ewc, ref_ewc)] + [(terms[k], ref_terms[k]) for k in terms]:
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want)

    per_module = [module_penalties(m.lora_A.weight, m.lora_B.weight, m.scaling, *parts(basis[n]), cfg.beta, cfg.eps)
                  for n, m in lora_modules(model).items()]
    S = {k: sum(t[k] for t in per_module) for k in per_module[0]}
    by_module = cfg.lambda_a * S["R_A"] + cfg.lambda_t * S["R_T"] + cfg.lambda_nc * (
        cfg.alpha * S["E_rm"] + (1 - cfg.alpha) * S["E_geo"])
    torch.testing.assert_close(total, by_module)
    params = lora_parameters(model)
    for stacked, single in zip(torch.autograd.grad(ref, params), torch.autograd.grad(by_module, params)):
        torch.testing.assert_close(stacked, single)  # stacking same-shape modules changes no gradient
    dWs = {n: delta_weight(m) for n, m in lora_modules(model).items()}
    torch.testing.assert_close(l2, sum(dW.pow(2).sum() for dW in dWs.values()))
    torch.testing.assert_close(ewc, 0.5 * sum((F_diag[n] * dW.pow(2)).sum() for n, dW in dWs.items()))

    fresh, _ = lora_stack([(16, 16), (16, 24)])
    for m in lora_modules(fresh).values():
        nn.init.zeros_(m.lora_B.weight)  # the first step: B = 0, every ratio is 0/0 without ε
    reg, at_zero = penalties(fresh, {n: basis[n] for n in list(basis)[:2]}, cfg)
    reg.backward()
    assert reg == 0 and all(v == 0 for v in at_zero.values()), at_zero
    assert all(torch.isfinite(p.grad).all() for p in lora_parameters(fresh)), "non-finite gradient at B = 0"

    geo_only = AlignGuardConfig(lambda_a=0, lambda_t=0, lambda_nc=1, alpha=0, beta=cfg.beta)
    no_rm, no_rm_terms = penalties(model, basis, geo_only)
    torch.testing.assert_close(no_rm_terms["E_rm"], ref_terms["E_rm"])  # weight 0: evaluated for the log only
    torch.testing.assert_close(no_rm, S["E_geo"])
    with pytest.raises(ValueError, match="missing"):
        penalties(model, {n: basis[n] for n in list(basis)[:2]}, cfg)


# ----------------------------------------------------------------------------------------------------------------
# Export


def test_save_and_load_adapter_round_trip(tmp_path):
    base = mlp()
    model = copy.deepcopy(base)
    cfg = LoRAConfig(r=4, alpha=8.0, targets=("q_proj", "o_proj"))
    add_lora(model, cfg)
    randomize_B(model)
    x = torch.randn(3, 8)
    out = tmp_path / "adapter"
    save_adapter(model, out, "tiny-base", cfg, meta={"lambda_a": 1e3, "data_hash": "abc"})
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["peft_type"], config["task_type"], config["r"], config["lora_alpha"]) == ("LORA", "CAUSAL_LM", 4, 8)
    assert config["target_modules"] == ["o_proj", "q_proj"] and config["base_model_name_or_path"] == "tiny-base"
    assert json.loads((out / "alignguard.json").read_text())["meta"]["data_hash"] == "abc"
    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert tensors["base_model.model.q_proj.lora_A.weight"].shape == (4, 8)
    assert tensors["base_model.model.o_proj.lora_B.weight"].shape == (8, 4)
    assert len(tensors) == 4

    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_adapter(model, out, "tiny-base", cfg)
    save_adapter(model, out, "tiny-base", cfg, overwrite=True)
    with pytest.raises(ValueError, match="does not describe"):
        save_adapter(model, tmp_path / "other", "tiny-base", LoRAConfig(r=4, alpha=4.0))

    fresh = copy.deepcopy(base)
    assert sorted(load_adapter(fresh, out)) == ["o_proj", "q_proj"]
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)

    tensors["base_model.model.q_proj.lora_A.weight"] = torch.zeros(4, 7)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=r"safetensors: base_model.model.q_proj.lora_A.weight has shape \[4, 7\]"):
        load_adapter(copy.deepcopy(base), out)
    del tensors["base_model.model.q_proj.lora_A.weight"]
    save_file(tensors, str(out / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=r"missing \['base_model.model.q_proj.lora_A.weight'\]"):
        load_adapter(copy.deepcopy(base), out)


def test_load_adapter_into_an_adapted_model_needs_its_scaling_and_no_merge(tmp_path):
    """A model that already has LoRA (rank 4, s = 2) takes a file of the same rank and scaling in place: its A and
    B become the file's, outputs those of the model saved. At another scaling (s = 1, same shapes) or merged, the
    file is refused and A, B are left as they were: s·B·A would silently be another ΔW, a merged weight stale."""
    base = mlp()
    saved = copy.deepcopy(base)
    cfg = LoRAConfig(r=4, alpha=8.0, targets=("q_proj", "o_proj"))
    add_lora(saved, cfg)
    randomize_B(saved)
    save_adapter(saved, tmp_path / "a", "base", cfg)
    x = torch.randn(3, 8)
    model = copy.deepcopy(base)
    add_lora(model, cfg)
    assert sorted(load_adapter(model, tmp_path / "a")) == ["o_proj", "q_proj"]
    torch.testing.assert_close(model(x), saved(x), rtol=0, atol=0)
    for refuse in ("scaling", "merged"):
        model = copy.deepcopy(base)
        add_lora(model, replace(cfg, alpha=4.0) if refuse == "scaling" else cfg)
        if refuse == "merged":
            merge_lora(model)
        before = _peft_state(model)
        with pytest.raises(ValueError, match="LoRA modules are merged or their scaling is not s = 2"):
            load_adapter(model, tmp_path / "a")
        after = _peft_state(model)
        assert all(torch.equal(before[k], after[k]) for k in before), refuse


def test_save_adapter_writes_nothing_when_meta_is_not_json(tmp_path):
    model = mlp()
    cfg = LoRAConfig(r=4, alpha=8.0, targets=("q_proj",))
    add_lora(model, cfg)
    with pytest.raises(TypeError, match="not JSON serializable"):
        save_adapter(model, tmp_path / "a", "base", cfg, meta={"when": object()})
    assert not (tmp_path / "a").exists()
    save_adapter(model, tmp_path / "a", tmp_path / "base", cfg)  # a Path is written as its string
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        str(tmp_path / "base")


def test_lora_config_needs_targets():
    with pytest.raises(ValueError, match="targets is empty"):
        LoRAConfig(targets=())


@pytest.mark.parametrize("field, value, message", [
    ("init_lora_weights", "pissa", "'init_lora_weights' = 'pissa' is not supported: PEFT rewrites W0"),
    ("init_lora_weights", "olora", "'init_lora_weights' = 'olora' is not supported"),
    ("alora_invocation_tokens", [3, 4], r"'alora_invocation_tokens' = \[3, 4\] is not supported"),
    ("use_dora", True, "'use_dora' = True is not supported"),
    ("rank_pattern", {"q_proj": 2}, "'rank_pattern' = {'q_proj': 2} is not supported"),
    ("some_future_field", 1, "'some_future_field' = 1 is not supported"),
    ("bias", "all", "'bias' = 'all' is not supported"),
    ("peft_type", "IA3", "'peft_type' = 'IA3': only 'LORA'"),
    ("r", None, "'r' is missing or not a number"),
    ("r", 2.5, "'r' = 2.5: expected an integer >= 1"),
    ("r", float("inf"), "'r' = inf: expected an integer >= 1"),
    ("lora_alpha", 10**400, "'lora_alpha' is a number too large for a float"),
    ("lora_dropout", "0.1", "'lora_dropout' = '0.1': expected a number in"),
    ("lora_alpha", 0, "'lora_alpha' = 0: expected a finite number other than 0"),
    ("lora_dropout", 1.5, "'lora_dropout' = 1.5: expected a number in"),
])
def test_load_adapter_refuses_what_peft_would_compute_differently(tmp_path, field, value, message):
    model, base = mlp(), mlp()
    cfg = LoRAConfig(r=4, alpha=8.0, targets=("q_proj", "o_proj"))
    add_lora(model, cfg)
    save_adapter(model, tmp_path / "a", "base", cfg)
    c = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    c[field] = value
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(c))
    with pytest.raises(ValueError, match=f"adapter_config.json: field {message}"):
        load_adapter(base, tmp_path / "a")
    assert not lora_modules(base)


def test_load_adapter_refuses_a_bad_rank_or_non_finite_weights_naming_the_file(tmp_path):
    """r = -2 in adapter_config.json, or a NaN in a lora_A: ValueError naming the file (and the tensor), the model
    as it was (a NaN adapter would be scored, or trained on, as if it were a result)."""
    model, base = mlp(), mlp()
    cfg = LoRAConfig(r=4, alpha=8.0, targets=("q_proj",))
    add_lora(model, cfg)
    save_adapter(model, tmp_path / "a", "base", cfg)
    c = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**c, "r": -2}))
    with pytest.raises(ValueError, match=r"adapter_config.json: field 'r' = -2: expected an integer >= 1"):
        load_adapter(base, tmp_path / "a")
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(c))
    st = tmp_path / "a" / "adapter_model.safetensors"
    tensors = load_file(str(st))
    tensors["base_model.model.q_proj.lora_A.weight"][0, 1] = float("nan")
    save_file(tensors, str(st))
    with pytest.raises(ValueError, match=r"adapter_model.safetensors: tensor base_model.model.q_proj.lora_A.weight "
                                         r"holds NaN or infinite values \(1 of 2 tensors\)"):
        load_adapter(base, tmp_path / "a")
    assert not lora_modules(base)


def test_load_adapter_names_the_file_of_an_unreadable_adapter(tmp_path):
    """A config that is not JSON, or not an object, and weights cut short: ValueError naming the file, the model as
    it was (they were json's error without a path, an AttributeError and a SafetensorError)."""
    model, base = mlp(), mlp()
    cfg = LoRAConfig(r=4, alpha=8.0, targets=("q_proj",))
    add_lora(model, cfg)
    save_adapter(model, tmp_path / "a", "base", cfg)
    config, weights = tmp_path / "a" / "adapter_config.json", tmp_path / "a" / "adapter_model.safetensors"
    good = config.read_text()
    for text, message in (("{\n  'r': 4}", r"adapter_config.json, line 2: not valid JSON"),
                          ("[1, 2]", "adapter_config.json: expected a JSON object, got list")):
        config.write_text(text)
        with pytest.raises(ValueError, match=message):
            load_adapter(base, tmp_path / "a")
    config.write_text(good)
    weights.write_bytes(weights.read_bytes()[:40])
    with pytest.raises(ValueError, match="adapter_model.safetensors: not a readable safetensors file"):
        load_adapter(base, tmp_path / "a")
    assert not lora_modules(base)


def test_load_adapter_adapts_exactly_the_modules_it_holds_and_changes_nothing_on_error(tmp_path):
    """Suffixes would adapt every q_proj although the file holds one (PEFT's layers_to_transform writes such
    files); an error after adapting left LoRA in the model, so that the next valid load failed too."""
    base = nn.ModuleDict(OrderedDict(a=mlp(seed=0), b=mlp(seed=1)))  # two q_proj modules
    model = copy.deepcopy(base)
    cfg = LoRAConfig(r=2, alpha=4.0, targets=("q_proj",))
    add_lora(model, cfg)
    randomize_B(model)
    tensors = {k: v for k, v in _peft_state(model).items() if ".a." in k}  # layer a only
    out = tmp_path / "one"
    save_adapter(model, out, "base", cfg)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    fresh = copy.deepcopy(base)
    assert load_adapter(fresh, out) == ["a.q_proj"] and list(lora_modules(fresh)) == ["a.q_proj"]
    x = torch.randn(3, 8)
    ref = copy.deepcopy(model)
    with torch.no_grad():
        ref.b.q_proj.lora_B.weight.zero_()
        for part in ("a", "b"):
            torch.testing.assert_close(fresh[part](x), ref[part](x), rtol=0, atol=0)

    bad = dict(tensors)
    bad["base_model.model.a.q_proj.lora_A.weight"] = torch.zeros(2, 7)
    save_file(bad, str(out / "adapter_model.safetensors"))
    fresh = copy.deepcopy(base)
    with pytest.raises(ValueError, match=r"a.q_proj.lora_A.weight has shape \[2, 7\]"):
        load_adapter(fresh, out)
    assert not lora_modules(fresh) and all(p.requires_grad for p in fresh.parameters())  # as it was
    save_file({"base_model.model.a.act.lora_A.weight": torch.zeros(2, 8),
               "base_model.model.a.act.lora_B.weight": torch.zeros(8, 2)}, str(out / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=r"\['a.act'\] is not an nn.Linear module"):
        load_adapter(fresh, out)
    save_file({}, str(out / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="holds no LoRA tensors"):
        load_adapter(fresh, out)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    assert load_adapter(fresh, out) == ["a.q_proj"]  # the same model, after three failed loads
    other_rank = copy.deepcopy(base)  # LoRA of rank 4 at the same scaling s = 2: the file's rank-2 tensors do not fit
    add_lora(other_rank, LoRAConfig(r=4, alpha=8.0, targets=("q_proj",)))
    with pytest.raises(ValueError, match=r"missing .*b.q_proj|has shape \[2, 8\], the model's \[4, 8\]"):
        load_adapter(other_rank, out)


def _peft_state(model):
    return {f"base_model.model.{n}.lora_{ab}.weight": getattr(m, f"lora_{ab}").weight.detach().clone()
            for n, m in lora_modules(model).items() for ab in "AB"}


# ----------------------------------------------------------------------------------------------------------------
# A tiny random transformers Llama, and PEFT


def tiny_hf_llama():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   vocab_size=128, intermediate_size=128)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_loads_our_adapter_with_the_same_logits(tmp_path, rslora):
    peft = pytest.importorskip("peft")
    base = tiny_hf_llama()
    model = copy.deepcopy(base)
    cfg = LoRAConfig(r=4, alpha=8.0, targets="all-linear", rslora=rslora)
    names = add_lora(model, cfg)
    assert "model.layers.1.self_attn.q_proj" in names and "model.layers.0.mlp.down_proj" in names
    assert "lm_head" not in names and len(names) == 14
    randomize_B(model, std=0.05)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, plain = model(ids).logits, base(ids).logits
    assert (ours - plain).abs().max() > 1e-3, "the adapter changes nothing; the comparison would be empty"
    base.config.save_pretrained(str(tmp_path / "base"))  # a local base path: PEFT looks nothing up online
    save_adapter(model, tmp_path / "adapter", str(tmp_path / "base"), cfg)
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(ids).logits, ours, rtol=0, atol=1e-5)
    peft_model.save_pretrained(str(tmp_path / "by_peft"))  # and back: PEFT's own files into our LoRA
    fresh = copy.deepcopy(base)
    assert sorted(load_adapter(fresh, tmp_path / "by_peft")) == sorted(names)
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, ours, rtol=0, atol=1e-5)


def test_peft_adapters_of_some_layers_load_and_pissa_ones_are_refused(tmp_path):
    """PEFT's own files: layers_to_transform=[0] adapts layer 0's q_proj alone (same logits here); PiSSA trains
    against a W0 that PEFT rewrites on loading, so the file alone does not give its model (refused)."""
    peft = pytest.importorskip("peft")
    base = tiny_hf_llama()
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    base.config.save_pretrained(str(tmp_path / "base"))
    for name, kw in (("layer0", dict(layers_to_transform=[0], init_lora_weights="gaussian")),
                     ("orthogonal", dict(init_lora_weights="orthogonal")),  # initialises A and B only: loads
                     ("pissa", dict(init_lora_weights="pissa"))):
        pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], **kw))
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
        pm.save_pretrained(str(tmp_path / name))
        fresh = copy.deepcopy(base)
        if name == "pissa":
            with pytest.raises(ValueError, match="'init_lora_weights' = 'pissa' is not supported"):
                load_adapter(fresh, tmp_path / name)
            assert not lora_modules(fresh)
            continue
        names = load_adapter(fresh, tmp_path / name)
        assert names == (["model.layers.0.self_attn.q_proj"] if name == "layer0" else
                         [f"model.layers.{i}.self_attn.q_proj" for i in range(2)])
        with torch.no_grad():
            torch.testing.assert_close(fresh(ids).logits, pm.eval()(ids).logits, rtol=0, atol=1e-5)


def test_alignguard_on_a_transformers_llama_trains():
    model = tiny_hf_llama()
    g = torch.Generator().manual_seed(0)

    def batch():
        ids = torch.randint(0, 128, (4, 12), generator=g)
        labels = torch.full_like(ids, -100)
        labels[:, 4:-1] = ids[:, 5:]  # shifted: position t predicts token t + 1; prompt and last position masked
        return {"input_ids": ids, "labels": labels}

    align, (ids, labels) = [batch(), batch()], batch().values()
    lora = LoRAConfig(r=4, alpha=8.0)
    basis = estimate_fisher(model, align, k=8, targets=lora.targets, generator=torch.Generator().manual_seed(0))
    add_lora(model, lora)
    again = estimate_fisher(model, align, k=8, generator=torch.Generator().manual_seed(0))
    for n in basis:
        torch.testing.assert_close(again[n].g, basis[n].g)
    W0 = model.model.layers[0].self_attn.q_proj.weight.clone()
    model.train()
    opt = torch.optim.AdamW(lora_parameters(model), lr=1e-2)
    losses = []
    for _ in range(20):
        logits = model(ids).logits
        task = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        reg, terms = penalties(model, basis, AlignGuardConfig(k=8))
        opt.zero_grad()
        (task + reg).backward()
        opt.step()
        losses.append(task.item())
    assert losses[-1] < losses[0] - 0.3, f"task loss {losses[0]:.3f} -> {losses[-1]:.3f}"
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, W0), "the base weight moved"
    assert float(terms["R_A"]) > 0 and float(terms["cos_literal"]) < 1e-6, terms

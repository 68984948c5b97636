"""AlignGuard-LoRA: LoRA fine-tuning that keeps a chat model's safety alignment (DESIGN.md section 3).

One vendorable file (torch + safetensors only) that works on any nn.Module with nn.Linear layers,
our Llama and a transformers LlamaForCausalLM alike:

    from alignguard import AlignGuardConfig, LoRAConfig, add_lora, estimate_fisher, penalties, save_adapter
    basis = estimate_fisher(model, align_batches, k=32, targets=("q_proj", "v_proj"))  # once, at W0
    add_lora(model, LoRAConfig(r=8, targets=("q_proj", "v_proj")))                     # base frozen
    reg, terms = penalties(model, basis, AlignGuardConfig())                           # every step
    (task_loss + reg).backward()
    save_adapter(model, "out/adapter", "path/to/base", LoRAConfig(r=8, targets=("q_proj", "v_proj")))

    python -c "import peft, transformers as t; peft.PeftModel.from_pretrained(
               t.AutoModelForCausalLM.from_pretrained('path/to/base'), 'out/adapter')"   # PEFT reads the adapter
    python -m pytest tests/test_alignguard.py -q

Notation, per adapted module: W0 (d_out, d_in) the frozen aligned weight; ΔW = s·B·A with B (d_out, r),
A (r, d_in), s = alpha/r; Ā = E_t[x xᵀ] (d_in, d_in) and Ḡ = E_t[g gᵀ] (d_out, d_out) the K-FAC factors
of the Fisher F ≈ Ḡ ⊗ Ā; U_g (d_out, k_g), g and U_a (d_in, k_a), a their top eigenpairs;
C = U_gᵀ ΔW U_a (k_g, k_a); ΔW_A = U_g C U_aᵀ, ΔW_T = ΔW − ΔW_A. <X, Y> = tr(XᵀY), ||·|| Frobenius.
Batches are dicts of input_ids (B, T) and labels (B, T) already shifted: labels[b, t] is the token
position t predicts, -100 where there is no loss (prompt, padding).
"""

import contextlib
import functools
import json
import math
import os
import re
import warnings
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.utils.checkpoint import checkpoint


@dataclass
class LoRAConfig:
    r: int = 8  # rank of ΔW = s·B·A
    alpha: float = 16.0  # s = alpha / r (alpha / sqrt(r) with rslora)
    dropout: float = 0.0  # dropout on the input of A, training only
    targets: tuple[str, ...] | str = ("q_proj", "k_proj", "v_proj", "o_proj")  # exact last name components; all-linear
    rslora: bool = False  # rsLoRA scaling, keeps the update size stable across ranks
    init: str = "kaiming"  # A ~ kaiming-uniform (PEFT's default) or "gaussian" N(0, 1/r²); B = 0 always

    def __post_init__(self):
        self.targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        if not self.targets:
            raise ValueError("LoRAConfig.targets is empty: name the modules to adapt (e.g. 'q_proj') or 'all-linear'")
        if self.r < 1:
            raise ValueError(f"LoRAConfig.r (--lora-r) must be at least 1, got {self.r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"LoRAConfig.dropout (--lora-dropout) must be in [0, 1), got {self.dropout}")
        if not math.isfinite(self.alpha) or self.alpha == 0:
            raise ValueError(f"LoRAConfig.alpha (--lora-alpha) must be a finite number other than 0 (s = alpha / r "
                             f"scales every update), got {self.alpha}")
        if self.init not in ("kaiming", "gaussian"):
            raise ValueError(f"LoRAConfig.init must be 'kaiming' or 'gaussian', got {self.init!r}")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)


@dataclass
class AlignGuardConfig:
    k: int = 32  # eigenvectors kept per K-FAC factor (U_g, U_a)
    fisher: str = "true"  # "true": ŷ sampled from the aligned model; "empirical": ŷ = the data's token
    lambda_a: float = 1e3  # on Σ R_A (nats); ≫ 1 because the per-module sum underestimates the KL (DESIGN 3.1)
    lambda_t: float = 1e-3  # on Σ ||ΔW_T||²: a loose trust region that must not stop the task being learned
    lambda_nc: float = 0.01  # on Σ [α E_rm + (1−α) E_geo]: each ≤ 1 per module, so O(10) over ~100 modules
    alpha: float = 0.5  # mix of E_rm (coordinate overlap) and E_geo (subspace overlap)
    beta: float = 1.0  # ρ = 1 + β·sigmoid(...) weighs large coordinates up to (1+β)x in E_rm
    eps: float = 1e-8  # keeps E_rm, E_geo finite at ΔW = 0 (B = 0 at the start) and damps them while ΔW is tiny
    rm_chunk: int = 2**19  # most ΔW entries E_rm forms at once, whole modules (5 fp32 buffers: 10 MiB, or one larger module's; kept on a CPU); README: Performance
    compile_rm: bool = False  # torch.compile E_rm (dynamic shapes): ~50 s of compiling, then 15-22% less penalty time on CPU

    def __post_init__(self):
        if self.fisher not in ("true", "empirical"):
            raise ValueError(f"AlignGuardConfig.fisher must be 'true' or 'empirical', got {self.fisher!r}")
        for name in ("k", "rm_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"AlignGuardConfig.{name} (--{name.replace('_', '-')}) must be at least 1, "
                                 f"got {getattr(self, name)}")
        for name in ("lambda_a", "lambda_t", "lambda_nc", "beta", "eps"):  # NaN fails every comparison
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"AlignGuardConfig.{name} (--{name.replace('_', '-')}) must be a finite number >= 0, "
                                 f"got {getattr(self, name)}")
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"AlignGuardConfig.alpha (--alpha) must be in [0, 1], got {self.alpha}")


# ----------------------------------------------------------------------------------------------------------------
# LoRA


def _f32(t: torch.Tensor) -> torch.Tensor:
    """t in fp32, or in fp64 if it already is: statistics and penalties never run in half precision."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


class LoRALinear(nn.Module):
    """y = x W0ᵀ + b + s·B(A(dropout(x))), replacing an nn.Linear in place.

    W0 and b stay under nn.Linear's keys (`weight`, `bias`, frozen) so the base model's state-dict keys
    do not change; A and B are `lora_A.weight` (r, d_in) and `lora_B.weight` (d_out, r), PEFT's layout.
    A and B are fp32 (fp64 for an fp64 base) whatever the base dtype: they are the trained master weights.
    ΔW is never formed here: two thin matmuls cost r·(d_in + d_out) per token instead of d_in·d_out.
    merge_lora forms W0 + ΔW once, beside W0, for inference; W0 itself is never written.
    """

    def __init__(self, base: nn.Linear, cfg: LoRAConfig):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # the same Parameter object: ties to other modules survive
        self.register_parameter("bias", base.bias)
        kw = dict(bias=False, device=base.weight.device, dtype=_f32(base.weight).dtype)
        self.lora_A = nn.Linear(self.in_features, cfg.r, **kw)
        self.lora_B = nn.Linear(cfg.r, self.out_features, **kw)
        self.lora_dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.r, self.scaling = cfg.r, cfg.scaling
        if cfg.init == "kaiming":
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        else:
            nn.init.normal_(self.lora_A.weight, std=1 / cfg.r)
        nn.init.zeros_(self.lora_B.weight)  # ΔW = 0: training starts exactly at the aligned model
        # W0 + ΔW while merged (merge_lora): a buffer, so that it moves with the module, outside the state dict
        self.register_buffer("merged_weight", None, persistent=False)
        self.disabled = False  # adapter skipped (disable_lora)

    @property
    def merged(self) -> bool:
        return self.merged_weight is not None

    def forward(self, x):
        if self.merged_weight is not None:
            return F.linear(x, self.merged_weight, self.bias)
        y = F.linear(x, self.weight, self.bias)
        if self.disabled:
            return y
        # A and B are fp32: x of a bf16 base is cast to them, but not under autocast without dropout, where F.linear
        # casts x and A to bf16 itself and an fp32 copy of x would be cast straight back (bf16 LoRA step, small
        # shape: 4-8% less time). Dropout does need fp32: in bf16 its 1/(1-p) would be rounded, a biased scale.
        dropout = self.training and isinstance(self.lora_dropout, nn.Dropout)
        if dropout or not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.lora_A.weight.dtype)
        h = self.lora_A(self.lora_dropout(x))  # (.., r)
        # s·B h as (s·B) h: the scaling multiplies a (d_out, r) matrix, not the (.., d_out) output, and the sum
        # goes into y in place (F.linear's backward does not need its output): 4-7% of an fp32 LoRA step on CPU
        return y.add_(F.linear(h, self.scaling * self.lora_B.weight).to(y.dtype))

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"scaling={self.scaling:g}, merged={self.merged}, disabled={self.disabled}")


def find_targets(model: nn.Module, targets) -> dict[str, nn.Module]:
    """The nn.Linear (or already adapted LoRALinear) modules whose last name component equals a target.

    Exact component match, not substring: "proj" matches no "o_proj". "all-linear" takes every Linear
    but lm_head, whose output is the vocabulary. A target that matches nothing is a ValueError.
    """
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    found, lora_names, suffixes = {}, set(), set()
    for name, mod in model.named_modules():
        if not name or name.rpartition(".")[0] in lora_names:
            continue  # the root cannot be replaced in place; lora_A / lora_B are not targets
        if isinstance(mod, LoRALinear):
            lora_names.add(name)
        elif not isinstance(mod, nn.Linear):
            continue
        last = name.rpartition(".")[2]
        suffixes.add(last)
        if last in targets or ("all-linear" in targets and last != "lm_head"):
            found[name] = mod
    for t in targets:
        if not any(n.rpartition(".")[2] == t or t == "all-linear" for n in found):
            raise ValueError(f"LoRA target {t!r} matches no nn.Linear module; their names end in {sorted(suffixes)}")
    return found


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def _adapted(model: nn.Module) -> dict[str, LoRALinear]:
    mods = lora_modules(model)
    if not mods:
        raise ValueError("the model has no LoRA modules: call add_lora(model, cfg) first")
    return mods


def _check_modules(mods: dict, given: dict, what: str):
    missing, unknown = sorted(set(mods) - set(given)), sorted(set(given) - set(mods))
    if missing or unknown:
        raise ValueError(f"{what} does not match the LoRA modules: missing {missing}, unknown {unknown}")


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in lora_modules(model).values() for p in (m.lora_A.weight, m.lora_B.weight)]


def add_lora(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    """Replaces each target nn.Linear by a LoRALinear (B = 0, so the model's output is unchanged) and
    freezes every parameter but A and B. Returns the adapted module names. A second call is an error,
    not a second adapter stacked on the first."""
    if lora_modules(model):
        raise ValueError(f"the model already has LoRA on {len(lora_modules(model))} modules; add_lora runs once")
    return _adapt(model, find_targets(model, cfg.targets), cfg)


def _adapt(model: nn.Module, linears: dict[str, nn.Linear], cfg: LoRAConfig) -> list[str]:
    model.requires_grad_(False)
    for name, lin in linears.items():
        model.set_submodule(name, LoRALinear(lin, cfg))
    return list(linears)


def delta_weight(m: LoRALinear) -> torch.Tensor:
    """ΔW = s·B·A (d_out, d_in) in fp32, for merging and checks only: forward never forms it."""
    return m.scaling * (_f32(m.lora_B.weight) @ _f32(m.lora_A.weight))


def _merged(m: LoRALinear, W0: torch.Tensor) -> torch.Tensor:
    """W0 + ΔW, summed in fp32 on W0's device and rounded once to W0's dtype."""
    return (_f32(W0) + delta_weight(m).to(W0.device)).to(W0.dtype)


@torch.no_grad()
def merge_lora(model: nn.Module):
    """Every LoRA module runs one weight W0 + ΔW (formed in fp32, then the base dtype) in place of W0 and its two
    factors: inference pays one matmul per module, not three. The merged weight is a copy beside W0 (the memory of
    the adapted weights) and W0 is not written, so unmerge_lora gives back the same bits and a weight tied to another
    module (a tied lm_head's embed_tokens) keeps serving that module unchanged. A and B must not change while merged:
    the merged weight would not follow them. For a checkpoint with ΔW merged, use merged_state_dict."""
    mods = lora_modules(model)
    for name, m in mods.items():
        if m.disabled:
            raise ValueError(f"{name}: cannot merge a disabled LoRA module (inside disable_lora)")
    for m in mods.values():
        if not m.merged:
            m.merged_weight = _merged(m, m.weight)


def unmerge_lora(model: nn.Module):
    """The inverse of merge_lora: the merged weights are dropped, W0 and ΔW run again, bit for bit as before."""
    for m in lora_modules(model).values():
        m.merged_weight = None


@contextlib.contextmanager
def merged_lora(model: nn.Module):
    """merge_lora for the block where it keeps ΔW's precision, unmerge_lora after it. For generation, where a decode
    step's adapted modules each make one matmul instead of three thin ones and an add: the demo's 400 DRIFTCHECK
    prompts 3.63 -> 3.11 s, a 32-row batch of 32 new tokens on the SmolLM2-135M shape (all-linear, r = 8)
    5.3 -> 4.8-5.0 s once merged (merging took 0.1 s; the first batch after it ran slower, 6.2 s).

    Only fp32 and fp64 weights outside autocast are merged: in bf16 (a bf16 base, or autocast's bf16 copy of an
    fp32 weight) W0 + ΔW would be rounded at W0's scale, 8 significant bits, a large error in a small ΔW, where the
    unmerged form rounds W0 alone. Disabled and already merged modules are left as they are. In fp32, merging
    changes the last bits of the outputs (one sum in place of two). The merged weights take the memory of the
    adapted ones while the block runs."""
    mods = [m for m in lora_modules(model).values()
            if not (m.merged or m.disabled or torch.is_autocast_enabled(m.weight.device.type))
            and m.weight.dtype in (torch.float32, torch.float64)]
    with torch.no_grad():
        for m in mods:
            m.merged_weight = _merged(m, m.weight)
    try:
        yield model
    finally:
        for m in mods:
            m.merged_weight = None


@torch.no_grad()
def merged_state_dict(model: nn.Module, base: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The base model's state dict with W0 + ΔW in place of W0 and no lora_* keys, in W0's dtype; the model is
    untouched. base: the base model's state dict to merge into instead of the model's own, e.g. the fp32
    checkpoint of a model trained on a bf16 copy of it (rounding W0 + ΔW to bf16 would lose much of a small ΔW)."""
    sd = dict(model.state_dict()) if base is None else dict(base)  # W0 under `weight`, merged or not
    for name, m in lora_modules(model).items():
        sd.pop(f"{name}.lora_A.weight", None), sd.pop(f"{name}.lora_B.weight", None)
        sd[f"{name}.weight"] = _merged(m, sd[f"{name}.weight"])
    return sd


@contextlib.contextmanager
def disable_lora(model: nn.Module):
    """Runs the base model W0 inside the block (evaluation before/after without reloading)."""
    mods = list(lora_modules(model).values())
    if any(m.merged for m in mods):
        raise ValueError("cannot disable merged LoRA modules: call unmerge_lora(model) first")
    before = [m.disabled for m in mods]
    for m in mods:
        m.disabled = True
    try:
        yield model
    finally:
        for m, d in zip(mods, before):
            m.disabled = d


@torch.no_grad()
def remove_lora(model: nn.Module) -> list[str]:
    """Puts back a plain nn.Linear, holding the same weight and bias Parameters, in place of every
    LoRALinear (unmerged): the base model again, ready for another adapter of any rank or targets.
    Nothing is copied or reloaded. Returns the names of the modules restored."""
    mods = lora_modules(model)
    for name, m in mods.items():
        if m.merged:
            raise ValueError(f"{name}: cannot remove a merged LoRA module: call unmerge_lora(model) first")
        linear = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        linear.weight, linear.bias = m.weight, m.bias
        model.set_submodule(name, linear)
    return list(mods)


# ----------------------------------------------------------------------------------------------------------------
# Fisher information of the aligned model (DESIGN 3.1), computed once before training


@dataclass
class FisherBasis:
    U_g: torch.Tensor  # (d_out, k_g) top eigenvectors of Ḡ, eigenvalues descending
    g: torch.Tensor  # (k_g,) their eigenvalues
    U_a: torch.Tensor  # (d_in, k_a) top eigenvectors of Ā
    a: torch.Tensor  # (k_a,)
    n_tokens: int  # loss tokens Ā and Ḡ were averaged over
    w0_norm: float  # ||W0||_F at estimation: load_fisher refuses other weights with it
    w0_probe: torch.Tensor | None = None  # weight_probe(W0) at estimation (4, 4), CPU: a fingerprint the norm is not

    def to(self, device, dtype=None) -> "FisherBasis":
        return replace(self, **{f: getattr(self, f).to(device, dtype) for f in ("U_g", "g", "U_a", "a")})


def default_forward(model: nn.Module, batch: dict) -> torch.Tensor:
    """logits (B, T, V) = model(input_ids), taking `.logits` from a transformers output. A custom forward may
    instead return (N, V) logits at the loss positions only (labels ≠ -100, row-major order), which skips
    the vocabulary projection everywhere else."""
    out = model(batch["input_ids"])
    return out.logits if hasattr(out, "logits") else out


def _inverse_cdf(p: torch.Tensor, u: torch.Tensor, block: int = 256) -> torch.Tensor:
    """y (N,) = the first index whose cumulative mass exceeds u·Σp, for p (N, V) ≥ 0 and u (N,) in [0, 1).

    Two levels, so that no long fp32 running sum rounds the small masses away: the masses of blocks of
    `block` entries and their cumulative sum in fp64 pick the block, an fp64 cumulative sum inside it the
    entry. A token of zero mass is never returned. Rows that are not finite or hold no mass are refused."""
    N, V = p.shape
    q = F.pad(p, (0, -V % block)).view(N, -(-V // block), block)  # (N, nb, block), zero mass after V
    s = q.sum(-1, dtype=torch.float64)  # block masses (N, nb)
    c = s.cumsum(-1)  # (N, nb)
    total = c[:, -1:]  # (N, 1)
    if not bool((torch.isfinite(total) & (total > 0)).all()):
        raise ValueError("cannot sample: a row of probabilities is not finite or sums to 0 (NaN or inf logits?)")
    v = torch.minimum(u.to(torch.float64)[:, None] * total, total.nextafter(torch.zeros_like(total)))  # < total
    j = torch.searchsorted(c, v, right=True)  # (N, 1): the block holding v, a block of positive mass
    w = q.gather(1, j[..., None].expand(N, 1, block)).squeeze(1).double().cumsum(-1)  # (N, block) in block j
    rest = (v - (c.gather(1, j) - s.gather(1, j))).clamp_min(0)  # mass before v inside block j
    rest = torch.minimum(rest, w[:, -1:].nextafter(torch.zeros_like(rest)))  # < the block's mass
    i = torch.searchsorted(w, rest, right=True)  # (N, 1)
    return (j * block + i).squeeze(1)


def _categorical(p: torch.Tensor, generator=None) -> torch.Tensor:
    """One draw per row of p (N, V), p ≥ 0, by the inverse of its CDF from N uniforms. torch.multinomial
    draws an exponential per entry instead, N·V of them: 0.1 s of a K-FAC batch at the small bench shape's
    8k vocabulary (25% of it)."""
    return _inverse_cdf(p, torch.rand(p.shape[0], generator=generator, device=p.device, dtype=p.dtype))


def _log_likelihood(model, batch, forward, sample: bool, generator):
    """S = Σ_{t: labels_t ≠ -100} log p(ŷ_t | context), ŷ_t ~ p(· | context) if sample else labels_t.
    Returns (mask (B, T) of loss positions, S)."""
    logits = forward(model, batch)  # (B, T, V), or (N, V) at the loss positions already
    mask = batch["labels"] != -100
    if logits.dim() == 3:
        assert logits.shape[:2] == mask.shape, f"logits {tuple(logits.shape)} do not match labels {tuple(mask.shape)}"
        logits = logits[mask]  # (N, V)
    assert logits.shape[0] == int(mask.sum()), f"{logits.shape[0]} logit rows for {int(mask.sum())} loss positions"
    logp = F.log_softmax(_f32(logits), dim=-1)  # (N, V), fp32 so the sampling and the sum do not round
    if sample:  # the model's own predictions: the true Fisher, not the data's
        y = _categorical(logp.detach().exp(), generator)
    else:
        y = batch["labels"][mask]
    return mask, logp.gather(1, y[:, None]).sum()


@contextlib.contextmanager
def _recording(mods: dict[str, nn.Module]):
    """Forward hooks that record (input x, output y) of every call of the given modules."""
    calls = {n: [] for n in mods}

    def hook(name):
        def record(mod, inputs, y):
            if not y.requires_grad:  # a frozen model builds no graph; a leaf that requires grad starts it here
                y.requires_grad_(True)
            calls[name].append((inputs[0].detach(), y))
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in mods.items()]
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


def _batch_grads(model, batch, calls, forward, sample, generator):
    """(mask, {name: [(x, ∂S/∂y), ...] per call}) of one batch, S from _log_likelihood; `calls` are the
    (x, y) pairs _recording collects. ∂S/∂y comes from torch.autograd.grad: no weight gradient is allocated."""
    mask, S = _log_likelihood(model, batch, forward, sample, generator)
    ys = [y for c in calls.values() for _, y in c]
    grads = iter(torch.autograd.grad(S, ys, materialize_grads=True))
    return mask, {n: [(x, next(grads)) for x, _ in c] for n, c in calls.items()}


def _per_call_grads(model, batches, mods, forward, sample, generator, add):
    """add(*_batch_grads(..)) for each batch, at W0 in eval mode. A batch's tensors are all freed when `add`
    returns, before the next batch's forward: kept through it (a generator's and its loop's variables),
    they doubled the memory in use and every later batch ran on freshly faulted-in pages (K-FAC at the
    SmolLM2 shape, all-linear, 3 batches: 17.4-19.7 -> 12.8-15.3 s, the same factors bit for bit)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()  # the aligned model's own predictive distribution: no dropout noise
    try:
        with disable_lora(model), _recording(mods) as calls, torch.enable_grad():
            for batch in batches:
                batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
                add(*_batch_grads(model, batch, calls, forward, sample, generator))
                for c in calls.values():
                    c.clear()
    finally:
        model.train(was_training)


def _all_reduce(*ts: torch.Tensor):
    """Sums over ranks under torch.distributed (torchrun), so every rank divides the same totals."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        for t in ts:
            torch.distributed.all_reduce(t)


def _fisher_modules(model, targets) -> dict[str, nn.Module]:
    mods = lora_modules(model) if targets is None else find_targets(model, targets)
    if not mods:
        raise ValueError("the model has no LoRA modules: pass targets=(...) to choose its nn.Linear modules")
    return mods


def _add_into(acc: torch.Tensor, x: torch.Tensor, block: int = 2**18):
    """acc += x for an fp64 acc and an fp32 x, in blocks of rows of about `block` entries. The mixed-dtype add
    first casts x into a temporary of acc's dtype; for a whole (d, d) factor that is a fresh allocation each
    time, which took 36 ms per 1536 x 1536 factor at the SmolLM2 shape (3.2 s of a 7-13 s K-FAC batch),
    while a 2 MiB block's temporary stays in the cache (the batch: 6.1-6.6 s, the same sums bit for bit)."""
    if acc.device.type != "cpu":  # CUDA casts inside the add kernel: one launch, no temporary
        acc += x
        return
    rows = max(1, block // max(1, x.shape[-1]))
    for a, b in zip(acc.split(rows), x.split(rows)):
        a += b


def kfac_factors(model: nn.Module, batches, kind: str = "true", forward=None, generator=None,
                 targets=None) -> dict[str, tuple[torch.Tensor, torch.Tensor, int]]:
    """K-FAC factors of the aligned model's Fisher, exact averages over the N loss tokens:

        Ā = Σ_t x_t x_tᵀ / N  (d_in, d_in),   Ḡ = Σ_t g_t g_tᵀ / N  (d_out, d_out),
        g_t = ∂S/∂y_t,   S = Σ_{t ∈ loss} log p(ŷ_t | context),

    x_t, y_t the module's input and output at token t, ŷ_t sampled from the model ("true") or the
    label ("empirical"). S is a sum, not a mean, so g_t is the per-token gradient. Only loss positions
    (labels ≠ -100: response tokens) enter Ā and Ḡ. In a transformer g_t also carries gradient from
    later tokens through attention: the standard K-FAC-for-sequences choice. Evaluated at W0 (LoRA
    disabled, eval mode); sums in fp64, all-reduced across ranks before dividing. Modules: the LoRA
    modules, or with targets= the matching nn.Linear modules of a model without LoRA (same names).
    Returns {name: (Ā, Ḡ, N)}.
    """
    if kind not in ("true", "empirical"):
        raise ValueError(f"Fisher kind must be 'true' or 'empirical', got {kind!r}")
    mods = _fisher_modules(model, targets)
    f64 = dict(dtype=torch.float64, device=next(model.parameters()).device)
    sums = {n: (torch.zeros(m.in_features, m.in_features, **f64), torch.zeros(m.out_features, m.out_features, **f64),
                torch.zeros((), **f64)) for n, m in mods.items()}
    def add(mask, calls):  # one batch's Σ x xᵀ and Σ g gᵀ
        xxT = {}  # Σ x xᵀ once per input tensor: q, k, v_proj (and gate, up_proj) read the same one
        with torch.autocast(mask.device.type, enabled=False):  # second moments in fp32 under any autocast
            for n, c in calls.items():
                A_sum, G_sum, N = sums[n]
                for x, g in c:
                    assert x.shape[:-1] == mask.shape, f"{n}: input {tuple(x.shape)} vs labels {tuple(mask.shape)}"
                    key = (x.data_ptr(), x.shape, x.stride())  # every recorded input is alive: no address reuse
                    if key not in xxT:
                        xm = _f32(x[mask])  # (N_b, d_in): loss tokens only
                        xxT[key] = xm.T @ xm
                    g = _f32(g[mask])  # (N_b, d_out)
                    _add_into(A_sum, xxT[key])  # an fp32 product added into the fp64 sum
                    _add_into(G_sum, g.T @ g)
                    N += g.shape[0]

    _per_call_grads(model, batches, mods, forward or default_forward, kind == "true", generator, add)
    out = {}
    for n, (A_sum, G_sum, N) in sums.items():
        _all_reduce(A_sum, G_sum, N)
        N = int(N)
        if N == 0:
            raise ValueError("the Fisher batches hold no loss tokens (labels != -100)")
        out[n] = (A_sum.div_(N), G_sum.div_(N), N)  # in place: no second (d, d) fp64 buffer per factor
    return out


EIG_RTOL = 1e-6  # eigenvalues at or below EIG_RTOL·λ_max are the factor's null space, not alignment directions


def eig_topk(M: torch.Tensor, k: int, rtol: float = EIG_RTOL) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k eigenpairs (U, λ) of a symmetric PSD factor, λ descending; k clamped to the dimension and to the
    eigenvalues above rtol·λ_max (none for a zero factor). A factor of lower rank than k (fewer alignment tokens than its
    dimension, an input that spans a subspace) has a null space whose eigenvectors are arbitrary: counted in
    the basis, an update along them would cost nothing in R_A (g_i·a_j ≈ 0) and escape R_T (it is in ΔW_A);
    left out, it is task-specific, in R_T's trust region. 1e-6 lies above the fp32 rounding of the products
    x xᵀ (a rank-3 factor of width 64 from 3 tokens: null eigenvalues 1e-8 λ_max) and far below the top-k
    of a real model's factors.
    eigh runs in fp64: the small eigenvalues of a token second moment sit near fp32 rounding."""
    vals, vecs = torch.linalg.eigh(M.double())  # ascending
    lam = vals[max(0, len(vals) - k):].flip(0).clamp_min(0)  # the top k, descending; PSD: a negative one is rounding
    k = int((lam > rtol * lam[0]).sum()) if lam.numel() else 0
    # eigh returns column-major vectors; a row-major copy makes every later matmul take the same
    # kernel as a basis read back from disk, so a resumed run computes bit-identical penalties
    return vecs[:, len(vals) - k:].flip(1).contiguous(), lam[:k]


def weight_probe(W: torch.Tensor) -> torch.Tensor:
    """P = Uᵀ W V (4, 4) in fp32 on the CPU, for Gaussian U (d_out, 4), V (d_in, 4) drawn from seed 0: a
    fingerprint of W. ||W||_F alone takes the same value for weights with permuted rows, and near it for
    another random init of the same shape. Rounding W to bf16 moved P by 1-2e-3 relative (random weights of
    6 x 5 to 576 x 1536), other random weights or W's rows reversed by 0.7-1.6: load_fisher allows 1e-2."""
    g = torch.Generator().manual_seed(0)
    U, V = torch.randn(W.shape[0], 4, generator=g), torch.randn(W.shape[1], 4, generator=g)
    return (U.to(W.device).T @ (W.float() @ V.to(W.device))).cpu()


def estimate_fisher(model: nn.Module, batches, k: int, kind: str = "true", forward=None, generator=None,
                    targets=None) -> dict[str, FisherBasis]:
    """Per module, F ≈ Ḡ ⊗ Ā (kfac_factors) kept as top-k eigenpairs: Ḡ ≈ U_g diag(g) U_gᵀ,
    Ā ≈ U_a diag(a) U_aᵀ, so the Fisher's eigenpairs are (g_i·a_j, u_g,i ⊗ u_a,j). Kept in fp32 (fp64 for
    an fp64 model) on the module's device: that is all the penalties need."""
    factors = kfac_factors(model, batches, kind, forward, generator, targets)
    named = dict(model.named_modules())
    basis, short, whole = {}, [], []
    for n, (A_bar, G_bar, N) in factors.items():
        W = named[n].weight
        (U_g, g), (U_a, a) = eig_topk(G_bar, k), eig_topk(A_bar, k)
        basis[n] = FisherBasis(U_g, g, U_a, a, N, W.float().norm().item(), weight_probe(W)).to(W.device, _f32(W).dtype)
        sides = (("Ḡ", U_g, W.shape[0]), ("Ā", U_a, W.shape[1]))
        short += [f"{n} {what} {U.shape[1]}" for what, U, d in sides if U.shape[1] < min(k, d)]
        whole += [f"{n} {what} {d}" for what, U, d in sides if U.shape[1] == d]
    if whole:
        warnings.warn(f"{len(whole)} Fisher factors keep every direction of their side (k = {k} is at least "
                      "its width), so the split ΔW_A = P_g ΔW P_a divides nothing on that side (P = I); a module "
                      f"with both has ΔW_T = 0, only R_A applies: {', '.join(whole[:6])}"
                      f"{' ...' if len(whole) > 6 else ''}")
    if short:
        warnings.warn(f"{len(short)} Fisher factors have fewer than k = {k} eigenvalues above {EIG_RTOL:g}·λ_max, so "
                      f"their bases keep fewer directions (more alignment tokens would fill them): {', '.join(short[:6])}"
                      f"{' ...' if len(short) > 6 else ''}")
    return basis


def _atomic_write(path, write):
    """write(tmp) then os.replace: a crash leaves the old file or the new one, never half of one. The file
    gets the mode the umask gives a new file (safetensors' save_file makes its files private, 0600)."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_safetensors(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, header metadata) of a safetensors file, with a ValueError that names the file when it is not one
    (cut short by a kill or a full disk, or another format): safetensors raises its own SafetensorError, which
    names nothing."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}, f.metadata() or {}
    except SafetensorError as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None


def read_json_object(path) -> dict:
    """The JSON object in path, a ValueError naming the file and line otherwise."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}, line {e.lineno}: not valid JSON ({e.msg})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _is_fisher_file(path, key: str = "alignguard_fisher") -> bool:
    try:
        with safe_open(str(path), framework="pt") as f:
            return key in (f.metadata() or {})
    except Exception:  # not a safetensors file at all
        return False


def _read_fisher_file(path, key: str, what: str, expect: dict | None) -> tuple[dict, dict[str, torch.Tensor]]:
    """(header, tensors) of a Fisher file written by save_fisher or save_diag_fisher (its metadata under `key`);
    ValueError when it has none, or when a key of `expect` differs from the saved meta."""
    tensors, metadata = read_safetensors(path)
    if key not in metadata:
        raise ValueError(f"{path} is not an AlignGuard {what}: no {key!r} metadata")
    info = json.loads(metadata[key])
    for k, want in (expect or {}).items():
        if info["meta"].get(k) != want:
            raise ValueError(f"{path}: the {what} has {k}={info['meta'].get(k)!r}, expected {want!r}")
    return info, tensors


def save_fisher(path, basis: dict[str, FisherBasis], meta: dict):
    """Safetensors `<module>.U_g`, `.g`, `.U_a`, `.a` plus a JSON header: per module its weight shape
    (d_out, d_in), N, ||W0||_F and weight_probe(W0), and the caller's meta, e.g. {"k": 32, "kind": "true",
    "data_hash": h}, so that load_fisher can refuse a basis made for another model, other weights or other
    data. Replaces an earlier Fisher basis at `path`, never another file."""
    if os.path.exists(path) and not _is_fisher_file(path):
        raise FileExistsError(f"{path} exists and is not an AlignGuard Fisher basis; refusing to overwrite it")
    tensors, modules = {}, {}
    for n, fb in basis.items():
        for f in ("U_g", "g", "U_a", "a"):
            tensors[f"{n}.{f}"] = getattr(fb, f).detach().float().cpu().contiguous()
        modules[n] = {"shape": [fb.U_g.shape[0], fb.U_a.shape[0]], "n_tokens": fb.n_tokens, "w0_norm": fb.w0_norm}
        if fb.w0_probe is not None:
            modules[n]["w0_probe"] = fb.w0_probe.tolist()
    header = json.dumps({"modules": modules, "meta": meta}, sort_keys=True)
    _atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"alignguard_fisher": header}))


def load_fisher(path, model: nn.Module | None = None, expect: dict | None = None) -> dict[str, FisherBasis]:
    """Inverse of save_fisher. ValueError naming the mismatch when a key of `expect` differs from the saved
    meta, or, given `model`: a module is missing or has another weight shape, its ||W0||_F differs by more
    than 1e-3 relative or its weight_probe by more than 1e-2 relative (other weights), or the model's LoRA
    modules are not the basis's modules.
    Tensors go to each module's device."""
    info, tensors = _read_fisher_file(path, "alignguard_fisher", "Fisher basis", expect)
    basis = {n: FisherBasis(*(tensors[f"{n}.{f}"] for f in ("U_g", "g", "U_a", "a")), d["n_tokens"], d["w0_norm"],
                            torch.tensor(d["w0_probe"]) if "w0_probe" in d else None)
             for n, d in info["modules"].items()}
    if model is None:
        return basis
    adapted, named = lora_modules(model), dict(model.named_modules())
    if adapted:
        _check_modules(adapted, basis, f"the Fisher basis in {path}")
    for n, fb in basis.items():
        m, shape = named.get(n), info["modules"][n]["shape"]
        if not isinstance(m, (nn.Linear, LoRALinear)):
            raise ValueError(f"{path}: module {n!r} of the Fisher basis is not a Linear layer of this model")
        if list(m.weight.shape) != shape:
            raise ValueError(f"{path}: module {n!r} has weight shape {list(m.weight.shape)}, the basis {shape}")
        norm = m.weight.float().norm().item()
        probe_off = 0.0 if fb.w0_probe is None else ((weight_probe(m.weight) - fb.w0_probe).norm()
                                                     / fb.w0_probe.norm().clamp_min(1e-30)).item()
        if abs(norm - fb.w0_norm) > 1e-3 * fb.w0_norm or probe_off > 1e-2:
            raise ValueError(f"{path}: module {n!r} has ||W0|| = {norm:.6g} and a weight probe {probe_off:.2g} "
                             f"(relative) off the one the basis was estimated at (||W0|| = {fb.w0_norm:.6g}): it was "
                             "made for other weights")
        basis[n] = fb.to(m.weight.device)
    return basis


def diag_fisher(model: nn.Module, batches, forward=None, targets=None) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher in weight space at W0, for the EWC baseline (DESIGN 3.4):

        F_diag = (1/M) Σ_m (∂ log p(example m) / ∂W)²   (d_out, d_in),
        log p(example) = Σ_{t ∈ loss} log p(label_t | context),

    M the examples (rows with a loss token). Per-example gradients from hooks, ∂/∂W = Σ_t g_t x_tᵀ over
    all positions t of the row (a prompt token's output feeds later loss tokens), never the square of a
    batch gradient: (Σ_m ∇_m)² ≠ Σ_m ∇_m². Rows of a batch must not interact, as in a transformer.
    """
    mods = _fisher_modules(model, targets)
    sums = {n: _f32(torch.zeros_like(m.weight)) for n, m in mods.items()}
    M = torch.zeros((), dtype=torch.float64, device=next(model.parameters()).device)
    def add(mask, calls):  # one batch's squared per-example gradients
        with torch.autocast(mask.device.type, enabled=False):  # squares of gradients in fp32 under any autocast
            for n, c in calls.items():  # one module at a time: (B, d_out, d_in) lives for one module only
                assert all(x.shape[0] == mask.shape[0] for x, _ in c), f"{n}: input is not (B, ..., d_in)"
                per_example = sum(torch.einsum("b...o,b...i->boi", _f32(g), _f32(x)) for x, g in c)
                sums[n] += per_example.pow(2).sum(0)  # Σ_m (∂ log p(example m)/∂W)², per_example (B, d_out, d_in)
        M.add_(mask.any(1).sum())

    _per_call_grads(model, batches, mods, forward or default_forward, False, None, add)
    _all_reduce(M, *sums.values())
    if M == 0:
        raise ValueError("the Fisher batches hold no loss tokens (labels != -100)")
    return {n: s / M.to(s.dtype) for n, s in sums.items()}


def save_diag_fisher(path, f_diag: dict[str, torch.Tensor], meta: dict):
    """diag_fisher's F_diag per module (safetensors) with the caller's meta in the header, written whole or not at
    all (a kill leaves no half file). Replaces an earlier diagonal Fisher at `path`, never another file."""
    if os.path.exists(path) and not _is_fisher_file(path, "alignguard_diag_fisher"):
        raise FileExistsError(f"{path} exists and is not an AlignGuard diagonal Fisher; refusing to overwrite it")
    tensors = {n: F_.detach().float().cpu().contiguous() for n, F_ in f_diag.items()}
    header = json.dumps({"meta": meta}, sort_keys=True)
    _atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"alignguard_diag_fisher": header}))


def load_diag_fisher(path, model: nn.Module | None = None, expect: dict | None = None) -> dict[str, torch.Tensor]:
    """Inverse of save_diag_fisher: ValueError naming the mismatch when a key of `expect` differs from the saved
    meta or, given `model`, a module is not a Linear layer of it with F_diag's shape. Tensors go to each module's
    device."""
    _, f_diag = _read_fisher_file(path, "alignguard_diag_fisher", "diagonal Fisher", expect)
    if model is None:
        return f_diag
    named = dict(model.named_modules())
    for n, F_ in f_diag.items():
        m = named.get(n)
        if not isinstance(m, (nn.Linear, LoRALinear)) or m.weight.shape != F_.shape:
            raise ValueError(f"{path}: {n!r} of shape {list(F_.shape)} is not a Linear layer of this model of that shape")
        f_diag[n] = F_.to(m.weight.device)
    return f_diag


# ----------------------------------------------------------------------------------------------------------------
# Decomposition (DESIGN 3.2) and penalties (3.3), all in fp32 (fp64 for fp64 inputs) whatever the autocast


def _inner(X, Y):
    """<X, Y> = tr(XᵀY) over the last two dims: one value per module of a stack (.., m, n)."""
    return (X * Y).sum((-2, -1))


def lora_split(A, B, s, U_g, U_a):
    """ΔW = s·B·A split along the Fisher basis in factors only, nothing (d_out, d_in) and nothing k x d:

        P = U_gᵀB (k_g, r),  Q = A U_a (r, k_a),  B⊥ = B − U_g P (d_out, r),  A⊥ = A − Q U_aᵀ (r, d_in)
        C = U_gᵀ ΔW U_a = s·P Q                             (k_g, k_a)
        X = U_gᵀ ΔW_T = s·P A⊥                               (k_g, d_in)
        Y = ΔW_T U_a = s·B⊥ Q                                (d_out, k_a)
        ||ΔW_T||² = s² (<B⊥ᵀB⊥, AAᵀ> + <PᵀP, A⊥A⊥ᵀ>)        (ΔW_T = s·B⊥A + U_g X, orthogonal parts)

    Assumes U_gᵀU_g = U_aᵀU_a = I. ||ΔW_T||² equals ||ΔW||² − ||C||², but the sum of squares avoids that
    difference's cancellation when ΔW lies almost inside the subspace. X and Y stay factored: every norm of
    them the penalties need is an r x r Gram product, O(k·r·d) per module rather than O(k²·d). Every argument
    may carry a leading stack dimension L (modules of one shape). Returns (C, P, Q, B⊥, A⊥, ||ΔW_T||²).
    """
    P, Q = U_g.mT @ B, A @ U_a  # (.., k_g, r), (.., r, k_a)
    C = s * P @ Q
    B_perp, A_perp = B - U_g @ P, A - Q @ U_a.mT  # (.., d_out, r), (.., r, d_in): outside span(U_g), span(U_a)
    dWT_sq = s**2 * (_inner(B_perp.mT @ B_perp, A @ A.mT) + _inner(P.mT @ P, A_perp @ A_perp.mT))
    return C, P, Q, B_perp, A_perp, dWT_sq


def dense_split(A, B, s, U_g, U_a):
    """The split materialised, (.., d_out, d_in) each: ΔW = s·B·A, ΔW_A = U_g C U_aᵀ, ΔW_T = ΔW − ΔW_A,
    written as DESIGN 3.2 states it: the reference the factored terms and e_rm's rank-r form are tested against."""
    dW = s * B @ A
    dW_A = U_g @ (s * (U_g.mT @ B) @ (A @ U_a)) @ U_a.mT
    return dW, dW_A, dW - dW_A


def _dots(X, Y):
    """<X, Y> per module of a stack (.., m, n) as BLAS dot products: no (.., m, n) product is materialised.
    Under torch.compile it is _inner, whose product inductor fuses into the sum (a Python loop over the
    stack would also fix its length L and compile again for every L)."""
    if torch.compiler.is_compiling():
        return _inner(X, Y)
    x, y = X.reshape(-1, X.shape[-2] * X.shape[-1]), Y.reshape(-1, Y.shape[-2] * Y.shape[-1])  # (L, m n)
    return torch.stack([torch.dot(a, b) for a, b in zip(x, y)]).view(X.shape[:-2])


_RM_WORKSPACE: dict = {}  # (device, dtype) -> the flat buffer e_rm's five dense matrices are views of (CPU only)
_RM_KEEP = 5 * 2**21  # most entries kept: five matrices of 2^21 entries (a module that large: 40 MiB in fp32)


def _rm_buffers(shape: torch.Size, like: torch.Tensor, n: int = 5) -> list[torch.Tensor]:
    """n uninitialised tensors of `shape`. On a CPU they are views of one flat buffer kept from call to call
    (grown to the largest chunk asked for, up to _RM_KEEP entries: larger chunks, a module of more than 2^21
    entries such as an adapted lm_head, get fresh tensors; release_rm_buffers frees it). torch's CPU tensors
    come from glibc's malloc, which maps a block above its (dynamic) mmap threshold afresh, faults its pages
    in at first touch and unmaps it when freed: in a process whose threshold is still low, as at the start
    of a run, that was more than half of E_rm's time (one stack of two 1536 x 576 modules, a fresh process:
    15.0-15.6 ms a call with fresh buffers, 6.5-6.7 ms with kept ones; 8.3 ms either way in a process where
    other tensors had raised the threshold). CUDA's caching allocator already reuses its blocks, and
    torch.compile plans its own, so there they are allocated as usual."""
    size, key = math.prod(shape), (like.device, like.dtype)
    if like.device.type != "cpu" or torch.compiler.is_compiling() or n * size > _RM_KEEP:
        return [torch.empty(shape, dtype=like.dtype, device=like.device) for _ in range(n)]
    flat = _RM_WORKSPACE.get(key)
    if flat is None or flat.numel() < n * size:
        flat = _RM_WORKSPACE[key] = None  # the smaller one is freed before the larger one is allocated
        _RM_WORKSPACE[key] = flat = torch.empty(n * size, dtype=like.dtype, device=like.device)
    return [flat[i * size:(i + 1) * size].view(shape) for i in range(n)]


def release_rm_buffers():
    """Frees the buffers e_rm keeps between calls (train.train calls it when training ends)."""
    _RM_WORKSPACE.clear()


def e_rm(A, B, s, U_g, U_a, beta, eps, with_grad=True):
    """E_rm of e_rm_value_and_grads, its gradient attached for autograd (with_grad=False: the value only)."""
    E, grad_A, grad_B = e_rm_value_and_grads(A.detach(), B.detach(), s, U_g, U_a, beta, eps, with_grad)
    return E if grad_A is None else _attach_grads(E, (A, grad_A), (B, grad_B))


def _attach_grads(value, *pairs):
    """value + Σ <g, x − x.detach()>: x − x.detach() is zero with derivative 1, so the result equals value
    and autograd gives each x the gradient g (computed outside autograd, of the same shape)."""
    return value + sum(_inner(g, x - x.detach()) for x, g in pairs)


def e_rm_value_and_grads(A, B, s, U_g, U_a, beta, eps, with_grad=True):
    """E_rm = Σ_ij ρ_ij |ΔW_A,ij ΔW_T,ij| / D,  D = Σ_ij ρ_ij (ΔW_A,ij² + ΔW_T,ij²)/2 + ε,  in [0, 1],
    ρ_ij = 1 + β·sigmoid((|ΔW_ij| − τ)/τ), τ = RMS(ΔW): large coordinates weigh more; ρ is a constant
    weight. ε: at B = 0 the ratio is 0/0. Needs β ≥ 0 (AlignGuardConfig checks it), so that ρ > 0.

    Returns (E, ∂E/∂A, ∂E/∂B), the gradients None when with_grad=False. Value and gradient come from one
    sweep over the (d_out, d_in) matrices (no backward pass over them), outside autograd. With
    S = sign(ΔW_A ⊙ ΔW_T) and ΔW_A = U_g U_gᵀ ΔW U_a U_aᵀ (a projection, self-adjoint):

        G_T = ∂E/∂ΔW_T = ρ (S ΔW_A − E ΔW_T) / D,   G_A = ∂E/∂ΔW_A = ρ (S ΔW_T − E ΔW_A) / D,
        ∂E/∂ΔW = G_T + U_g K U_aᵀ,   K = U_gᵀ (G_A − G_T) U_a   (k_g, k_a),
        ∂E/∂B = s·∂E/∂ΔW Aᵀ,   ∂E/∂A = s·Bᵀ ∂E/∂ΔW.

    With P_g = U_g U_gᵀ, P_a = U_a U_aᵀ: ΔW_A = s·(P_g B)(A P_a) and U_g K U_aᵀ = P_g (G_A − G_T) P_a, so
    every dense product has inner size r or 2r (or produces 2r rows or columns): the cost does not grow with k.
    As ρ > 0, ρ S ΔW_A = copysign(ρ ΔW_A, ΔW_T) and ρ S ΔW_T = copysign(ρ ΔW_T, ΔW_A), so S itself is never
    formed; ρ X = X + β·sigmoid(..)·X is one addcmul, so ρ is never formed either; and
    τ² = s²<BᵀB, AAᵀ>/(d_out d_in) comes from the factors.

    Autograd keeps only these (d_out, r) and (r, d_in) gradients (e_rm, module_penalties attach them): the
    memory saved for backward does not grow with the number of modules, and backward recomputes nothing
    (activation checkpointing would rebuild every matrix and differentiate it again). tests/ check it
    against autograd and gradcheck.
    """
    if beta < 0:
        raise ValueError(f"e_rm needs beta >= 0 (rho = 1 + beta * sigmoid(..) > 0), got {beta}")
    with torch.no_grad():
        # Five (.., d_out, d_in) buffers, no other dense temporary: every pass over them is memory traffic,
        # which is what E_rm costs on a CPU. 37 reads and writes per entry; the form before this one made 53.
        # (The AlignGuard step's overhead at the SmolLM2 shape, interleaved A/B: +21.2% -> +17.1%.)
        # ΔW_A = U_g C U_aᵀ = s·(P_g B)(A P_a) has rank ≤ r: formed with inner size r, not k.
        B_A, A_A = U_g @ (U_g.mT @ B), (A @ U_a) @ U_a.mT  # P_g B (.., d_out, r), A P_a (.., r, d_in)
        n = B.shape[-2] * A.shape[-1]
        tau = abs(s) * (_inner(B.mT @ B, A @ A.mT).clamp_min(0) / n).sqrt()  # RMS(ΔW) = ||ΔW|| / √(d_out d_in)
        tau = tau.clamp_min(torch.finfo(A.dtype).tiny)[..., None, None]
        AA = torch.cat([A, A_A], -2)                           # [A; A P_a] (.., 2r, d_in)
        dW_A, dW_T, sig, rA, rT = _rm_buffers(B.shape[:-1] + A.shape[-1:], A)  # (.., d_out, d_in) each
        torch.matmul(s * B_A, A_A, out=dW_A)
        torch.matmul(torch.cat([s * B, -s * B_A], -1), AA, out=dW_T)  # s·(B A − P_g B A P_a), inner size 2r
        torch.matmul((s * B) / tau, A, out=sig)                # ΔW / τ (0 at B = 0), then sigmoid(|ΔW|/τ − 1): ρ = 1 + β·sig
        sig.abs_().sub_(1).sigmoid_()
        torch.addcmul(dW_A, sig, dW_A, value=beta, out=rA)     # ρ ΔW_A
        torch.addcmul(dW_T, sig, dW_T, value=beta, out=rT)     # ρ ΔW_T
        D = 0.5 * (_dots(rA, dW_A) + _dots(rT, dW_T)) + eps
        G_T = torch.copysign(rA, dW_T, out=sig)                # ρ S ΔW_A  (ρ > 0)
        E = _dots(G_T, dW_T) / D                               # Σ ρ |ΔW_A ΔW_T| = <ρ S ΔW_A, ΔW_T>
        if not with_grad:
            return E, None, None
        E_ = -E[..., None, None]  # (.., 1, 1) to broadcast
        G_T.addcmul_(rT, E_)                                   # D·G_T = ρ (S ΔW_A − E ΔW_T)
        G_A = torch.copysign(rT, dW_A, out=rT).addcmul_(rA, E_)  # D·G_A = ρ (S ΔW_T − E ΔW_A)
        # ∂E/∂B = s (G_T Aᵀ + P_g (G_A − G_T)(A P_a)ᵀ), ∂E/∂A = s (Bᵀ G_T + (P_g B)ᵀ (G_A − G_T) P_a):
        # G_T is read once per side, against A and A P_a (B and P_g B) side by side
        r, c = A.shape[-2], (s / D)[..., None, None]
        GT_A = G_T @ AA.mT                                # (.., d_out, 2r): G_T Aᵀ | G_T (A P_a)ᵀ
        GT_B = torch.cat([B, B_A], -1).mT @ G_T           # (.., 2r, d_in): Bᵀ G_T over (P_g B)ᵀ G_T
        grad_B = c * (GT_A[..., :r] + U_g @ (U_g.mT @ (G_A @ A_A.mT - GT_A[..., r:])))
        grad_A = c * (GT_B[..., :r, :] + ((B_A.mT @ G_A - GT_B[..., r:, :]) @ U_a) @ U_a.mT)
    return E, grad_A, grad_B


@functools.cache
def compiled_e_rm():
    """e_rm_value_and_grads through torch.compile with dynamic shapes: its elementwise passes over the
    (d_out, d_in) matrices fused into a few, compiled for a handful of graphs rather than for every module
    shape (outside autograd, so no backward graph is compiled). Measured on CPU, the whole penalty of the
    SmolLM2 shape (all-linear, k = 32): 49 s of compiling in a fresh process with an empty inductor cache,
    then 708 ms a step against 830 ms eager (medians, interleaved)."""
    # the stacks of one model already make several graphs (shapes of 0/1 and equal sizes specialise, with_grad
    # and the dtype are guarded on); past dynamo's recompile_limit (8; cache_size_limit, its name before torch
    # 2.7 and an alias since) it would run eagerly, after one warning
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    return torch.compile(e_rm_value_and_grads, dynamic=True)


def module_penalties(A, B, s: float, U_g, g, U_a, a, beta: float = 1.0, eps: float = 1e-8,
                     rm_grad: bool = True, rm_fn=e_rm_value_and_grads,
                     rm_modules: int | None = None) -> dict[str, torch.Tensor]:
    """The terms of one module (or of a stack (L, ..) of same-shape modules, one value each), in fp32
    (fp64 for fp64 A) under any autocast:

        R_A   = ½ Σ_ij g_i a_j C_ij²  = ½ vec(ΔW_A)ᵀ (Ḡ ⊗ Ā) vec(ΔW_A)   (nats)
        R_T   = ||ΔW_T||²
        E_geo = ½ (||ΔW_Aᵀ ΔW_T||² + ||ΔW_A ΔW_Tᵀ||²) / (||ΔW_A||² ||ΔW_T||² + ε)
              = ½ (||Cᵀ X||² + ||C Yᵀ||²) / (||C||² ||ΔW_T||² + ε),  as ΔW_Aᵀ ΔW_T = U_a Cᵀ X
                                                                         and ΔW_A ΔW_Tᵀ = U_g C Yᵀ
              (X = s·P A⊥ and Y = s·B⊥ Q of lora_split, never formed)
        E_rm  = e_rm_value_and_grads (rm_fn), whose (d_out, d_in) matrices live only inside it
        cos_literal = <ΔW_A, ΔW_T>² / (||ΔW_A||² ||ΔW_T||² + ε), no grad, must stay ~0.

    cos_literal does not assume UᵀU = I as the other terms do: <ΔW_A, ΔW> = ||C||² always and
    ||ΔW_A||² = <(U_gᵀU_g) C (U_aᵀU_a), C>, so it is ~0 exactly when the basis is orthonormal and flags a
    corrupted one. With rm_grad=False E_rm is evaluated without autograd, a logged value only.
    rm_modules: E_rm takes at most this many modules of the stack at a time (its dense matrices bound
    the peak memory); the factored terms take the whole stack at once. The chunks' gradients are joined and
    attached to the whole stack once: attached to each chunk's slice, backward would add a zero-filled
    gradient of the whole stack per chunk (quadratic in the number of modules).
    """
    with torch.autocast(A.device.type, enabled=False):
        A, B = _f32(A), _f32(B)
        U_g, g, U_a, a = (t.to(A.device, A.dtype) for t in (U_g, g, U_a, a))
        C, P, Q, B_perp, A_perp, dWT_sq = lora_split(A, B, s, U_g, U_a)
        dWA_sq = _inner(C, C)
        R_A = 0.5 * _inner(g[..., :, None] * a[..., None, :], C.pow(2))
        # ||CᵀX||² = s²<(PᵀC)(PᵀC)ᵀ, A⊥A⊥ᵀ>, ||CYᵀ||² = s²<(QCᵀ)(QCᵀ)ᵀ, B⊥ᵀB⊥>: r x r Gram matrices
        PC, QC = P.mT @ C, Q @ C.mT  # (.., r, k_a), (.., r, k_g)
        geo = _inner(PC @ PC.mT, A_perp @ A_perp.mT) + _inner(QC @ QC.mT, B_perp.mT @ B_perp)
        E_geo = 0.5 * s**2 * geo / (dWA_sq * dWT_sq + eps)
        with_grad = rm_grad and torch.is_grad_enabled()
        chunks = [slice(None)]  # the whole stack at once, or rm_modules modules at a time
        if A.dim() > 2 and rm_modules:
            chunks = [slice(i, i + rm_modules) for i in range(0, A.shape[0], rm_modules)]
        parts = [rm_fn(A[c].detach(), B[c].detach(), s, U_g[c], U_a[c], beta, eps, with_grad=with_grad)
                 for c in chunks]  # (E, ∂E/∂A, ∂E/∂B) of each chunk
        E_rm = parts[0][0] if len(parts) == 1 else torch.cat([p[0] for p in parts])
        if with_grad:
            grad_A, grad_B = (torch.cat([p[i] for p in parts]) for i in (1, 2))  # (.., r, d_in), (.., d_out, r)
            E_rm = _attach_grads(E_rm, (A, grad_A), (B, grad_B))
        with torch.no_grad():
            lit_A = _inner((U_g.mT @ U_g) @ C @ (U_a.mT @ U_a), C)  # ||ΔW_A||²
            lit_T = s**2 * _inner(B.mT @ B, A @ A.mT) - 2 * dWA_sq + lit_A  # ||ΔW − ΔW_A||²
            cos = (dWA_sq - lit_A) ** 2 / (lit_A * lit_T + eps)  # <ΔW_A, ΔW_T> = <ΔW_A, ΔW> − ||ΔW_A||²
    return {"R_A": R_A, "R_T": dWT_sq, "E_rm": E_rm, "E_geo": E_geo, "cos_literal": cos}


def penalties(model: nn.Module, basis: dict[str, FisherBasis], cfg: AlignGuardConfig):
    """L_reg = λ_A Σ_ℓ R_A + λ_T Σ_ℓ R_T + λ_NC Σ_ℓ [α E_rm + (1−α) E_geo]; L = L_task + L_reg (DESIGN 3.3)

    Returns (L_reg, terms): terms holds the five sums over modules (module_penalties), detached, for the
    log. When λ_NC·α = 0, E_rm is evaluated for the log only, without its gradient.
    Modules of one shape are stacked and computed together: these matmuls are tiny, so per-module code
    would cost ~100 kernel launches per module and step. E_rm takes at most cfg.rm_chunk entries of ΔW
    at a time, which bounds its peak memory whatever the number of modules.
    """
    mods = _adapted(model)
    _check_modules(mods, basis, "the Fisher basis")
    rm_fn = compiled_e_rm() if cfg.compile_rm else e_rm_value_and_grads  # looked up here: tests swap it
    stacks = {}
    for n, m in mods.items():
        key = (m.lora_A.weight.shape, m.lora_B.weight.shape, basis[n].U_g.shape, basis[n].U_a.shape, m.scaling,
               m.lora_A.weight.device)
        stacks.setdefault(key, []).append(n)
    terms = {}
    for names in stacks.values():
        m0 = mods[names[0]]
        A = torch.stack([mods[n].lora_A.weight for n in names])  # (L, r, d_in)
        B = torch.stack([mods[n].lora_B.weight for n in names])  # (L, d_out, r)
        U_g, g, U_a, a = (torch.stack([getattr(basis[n], f) for n in names]) for f in ("U_g", "g", "U_a", "a"))
        t = module_penalties(A, B, m0.scaling, U_g, g, U_a, a, cfg.beta, cfg.eps,
                             rm_grad=cfg.lambda_nc * cfg.alpha > 0, rm_fn=rm_fn,
                             rm_modules=max(1, cfg.rm_chunk // (m0.in_features * m0.out_features)))
        terms = {key: terms.get(key, 0) + v.sum() for key, v in t.items()}
    total = (cfg.lambda_a * terms["R_A"] + cfg.lambda_t * terms["R_T"]
             + cfg.lambda_nc * (cfg.alpha * terms["E_rm"] + (1 - cfg.alpha) * terms["E_geo"]))
    return total, {key: v.detach() for key, v in terms.items()}


def l2_penalty(model: nn.Module) -> torch.Tensor:
    """Σ_ℓ ||ΔW||² = Σ_ℓ s²·<BᵀB, AAᵀ> (r x r Gram matrices), the proximal anchor of --method l2, fp32."""
    total = 0
    for m in _adapted(model).values():
        with torch.autocast(m.lora_A.weight.device.type, enabled=False):
            A, B = _f32(m.lora_A.weight), _f32(m.lora_B.weight)
            total = total + m.scaling**2 * _inner(B.T @ B, A @ A.T)
    return total


def _ewc_term(A, B, s, F_diag):
    return 0.5 * (F_diag * (s * B @ A).pow(2)).sum()


def ewc_penalty(model: nn.Module, F_diag: dict[str, torch.Tensor]) -> torch.Tensor:
    """½ Σ_ℓ Σ_ij F_diag,ij ΔW_ij² (EWC anchored at W0; F_diag from diag_fisher), fp32. ΔW is rebuilt in
    backward (checkpointing), so the memory saved for backward does not grow with the number of modules."""
    mods = _adapted(model)
    _check_modules(mods, F_diag, "the diagonal Fisher")
    total = 0
    for n, m in mods.items():
        with torch.autocast(m.lora_A.weight.device.type, enabled=False):
            args = (_f32(m.lora_A.weight), _f32(m.lora_B.weight), m.scaling, _f32(F_diag[n]))
            total = total + checkpoint(_ewc_term, *args, use_reentrant=False, preserve_rng_state=False)
    return total


# ----------------------------------------------------------------------------------------------------------------
# Export: PEFT-format adapter directory


ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "alignguard.json")
_PEFT_KEY = re.compile(r"base_model\.model\.(.+)\.lora_([AB])\.weight")


def _peft_keys(mods: dict[str, LoRALinear]) -> dict[str, nn.Parameter]:
    """PEFT's keys: base_model.model.<module>.lora_A.weight (r, d_in) and .lora_B.weight (d_out, r)."""
    return {f"base_model.model.{n}.lora_{ab}.weight": getattr(m, f"lora_{ab}").weight
            for n, m in mods.items() for ab in "AB"}


def _write_text(path, text: str):
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    _atomic_write(path, write)


def save_adapter(model: nn.Module, out_dir, base_model_name_or_path: str, lora_cfg: LoRAConfig,
                 meta: dict | None = None, overwrite: bool = False):
    """Writes a PEFT LoRA adapter that peft.PeftModel.from_pretrained loads: adapter_model.safetensors with
    `base_model.model.<module>.lora_A.weight` (r, d_in) and `.lora_B.weight` (d_out, r) in fp32,
    adapter_config.json, and AlignGuard's own metadata (λ's, k, Fisher kind, data hash: `meta`) in
    alignguard.json. Each file is written atomically, adapter_config.json last; a directory that already
    holds an adapter is refused unless overwrite=True."""
    mods = _adapted(model)
    bad = [n for n, m in mods.items() if m.r != lora_cfg.r or not math.isclose(m.scaling, lora_cfg.scaling)]
    if bad:
        raise ValueError(f"lora_cfg (r={lora_cfg.r}, alpha={lora_cfg.alpha}, rslora={lora_cfg.rslora}) does not "
                         f"describe the adapters of {bad[:3]} (r={mods[bad[0]].r}, s={mods[bad[0]].scaling:g})")
    existing = [f for f in ADAPTER_FILES if os.path.exists(os.path.join(out_dir, f))]
    if existing and not overwrite:
        raise FileExistsError(f"{out_dir} already holds an adapter ({', '.join(existing)}); pass overwrite=True")
    tensors = {key: p.detach().float().cpu().contiguous() for key, p in _peft_keys(mods).items()}
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base_model_name_or_path),
        "r": lora_cfg.r, "lora_alpha": lora_cfg.alpha, "lora_dropout": lora_cfg.dropout,
        "use_rslora": lora_cfg.rslora, "target_modules": sorted({n.rpartition(".")[2] for n in mods}),
        "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "use_dora": False,
        "init_lora_weights": True if lora_cfg.init == "kaiming" else "gaussian",
        "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": {}, "alpha_pattern": {}, "revision": None,
    }
    # both JSON texts first: meta that JSON cannot hold fails before anything is written
    ours = json.dumps({"lora": asdict(lora_cfg), "adapted_modules": list(mods), "meta": meta or {}}, indent=2)
    peft_config = json.dumps(config, indent=2)
    os.makedirs(out_dir, exist_ok=True)
    _atomic_write(os.path.join(out_dir, "adapter_model.safetensors"),
                  lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    _write_text(os.path.join(out_dir, "alignguard.json"), ours)
    _write_text(os.path.join(out_dir, "adapter_config.json"), peft_config)


# adapter_config.json fields that load_adapter reads or that do not change what the adapter computes. PEFT runs
# something other than W0 + s·B·A when any other field is set (DoRA, bias, rank patterns, aLoRA, layer
# replication, ...), so every other field must be off: None, False, {}, [] or "".
_PEFT_FIELDS = {"peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "r", "lora_alpha",
                "lora_dropout", "use_rslora", "target_modules", "exclude_modules", "layers_to_transform",
                "layers_pattern", "init_lora_weights", "bias", "auto_mapping", "peft_version", "megatron_core",
                "qalora_group_size", "runtime_config", "eva_config"}
# initialisations of A and B alone; PiSSA, OLoRA, CorDA, LoftQ and LoRA-GA also rewrite W0, which PEFT redoes on
# loading
_PEFT_INITS = (True, False, "gaussian", "eva", "orthogonal", "mica")


def load_adapter(model: nn.Module, adapter_dir) -> list[str]:
    """Reads a LoRA adapter written by save_adapter or peft's save_pretrained into model. A model without
    LoRA gets LoRA (the file's r, lora_alpha, lora_dropout, use_rslora) on exactly the modules the file
    holds tensors for; a model with LoRA must have those modules, unmerged, at the file's scaling. The
    config, the key set and the shapes are all checked before the model is changed, and errors name the file
    and the field or tensor: on an error the model is as it was. Returns the adapted module names."""
    cfg_path = os.path.join(adapter_dir, "adapter_config.json")
    st_path = os.path.join(adapter_dir, "adapter_model.safetensors")
    c = read_json_object(cfg_path)
    if c.get("peft_type") != "LORA":
        raise ValueError(f"{cfg_path}: field 'peft_type' = {c.get('peft_type')!r}: only 'LORA' adapters are supported")
    for key in ("r", "lora_alpha"):
        if not isinstance(c.get(key), (int, float)) or isinstance(c.get(key), bool):
            raise ValueError(f"{cfg_path}: field {key!r} is missing or not a number")
    if c.get("bias", "none") != "none":
        raise ValueError(f"{cfg_path}: field 'bias' = {c['bias']!r} is not supported (only 'none': no trained biases)")
    if c.get("init_lora_weights", True) not in _PEFT_INITS:
        raise ValueError(f"{cfg_path}: field 'init_lora_weights' = {c['init_lora_weights']!r} is not supported: PEFT "
                         "rewrites W0 for it when loading, which this loader does not")
    for key, value in c.items():
        if key not in _PEFT_FIELDS and value not in (None, False, {}, [], ""):
            raise ValueError(f"{cfg_path}: field {key!r} = {value!r} is not supported (PEFT would compute something "
                             "other than W0 + s·B·A with it)")
    tensors, _ = read_safetensors(st_path)
    names = set()
    for key in tensors:
        match = _PEFT_KEY.fullmatch(key)
        if match is None:
            raise ValueError(f"{st_path}: tensor {key!r} is not base_model.model.<module>.lora_A|lora_B.weight")
        names.add(match[1])
    if not names:
        raise ValueError(f"{st_path}: holds no LoRA tensors")

    def number(key, default=None):  # NaN for what is not a number, refused below
        v = default if c.get(key) is None else c[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return math.nan
        try:
            return float(v)
        except OverflowError:  # JSON's integers have no size limit (and 1e400 reads as inf)
            raise ValueError(f"{cfg_path}: field {key!r} is a number too large for a float") from None

    r, alpha, dropout = number("r"), number("lora_alpha"), number("lora_dropout", 0.0)
    checks = (("r", r.is_integer() and r >= 1, "an integer >= 1"),  # inf and NaN are not integers
              ("lora_alpha", math.isfinite(alpha) and alpha != 0, "a finite number other than 0"),
              ("lora_dropout", 0 <= dropout < 1, "a number in [0, 1)"))
    for key, ok, want in checks:
        if not ok:
            raise ValueError(f"{cfg_path}: field {key!r} = {c.get(key)!r}: expected {want}")
    cfg = LoRAConfig(r=int(r), alpha=alpha, dropout=dropout,
                     rslora=bool(c.get("use_rslora")), targets=tuple(sorted({n.rpartition(".")[2] for n in names})))
    mods = lora_modules(model)
    if mods:
        if any(m.merged for m in mods.values()) or any(not math.isclose(m.scaling, cfg.scaling) for m in mods.values()):
            raise ValueError(f"{cfg_path}: the model's LoRA modules are merged or their scaling is not s = {cfg.scaling:g}")
        targets = mods
    else:
        named = dict(model.named_modules())
        not_linear = sorted(n for n in names if not isinstance(named.get(n), nn.Linear))
        if not_linear:
            what = "is not an nn.Linear module" if len(not_linear) == 1 else "are not nn.Linear modules"
            raise ValueError(f"{st_path}: {not_linear[:3]} {what} of the model ({len(not_linear)} of {len(names)})")
        targets = {n: named[n] for n in sorted(names)}
    shapes = {}
    for n, m in targets.items():
        r = m.r if mods else cfg.r  # an adapted model keeps its own rank
        shapes[f"base_model.model.{n}.lora_A.weight"] = (r, m.in_features)
        shapes[f"base_model.model.{n}.lora_B.weight"] = (m.out_features, r)
    missing, unknown = sorted(shapes.keys() - tensors.keys()), sorted(tensors.keys() - shapes.keys())
    if missing or unknown:
        raise ValueError(f"{st_path} does not match the model's LoRA modules: missing {missing}, unknown {unknown}")
    for key, shape in shapes.items():
        if tensors[key].shape != shape:
            raise ValueError(f"{st_path}: {key} has shape {list(tensors[key].shape)}, the model's {list(shape)}")
    bad = [key for key in shapes if not torch.isfinite(tensors[key]).all()]
    if bad:  # scored or trained on, it would give numbers that look like results
        raise ValueError(f"{st_path}: tensor {bad[0]} holds NaN or infinite values ({len(bad)} of {len(shapes)} "
                         "tensors): the run that wrote it diverged or the file is damaged")
    if not mods:
        _adapt(model, targets, cfg)
        mods = lora_modules(model)
    with torch.no_grad():
        for key, p in _peft_keys(mods).items():
            p.copy_(tensors[key])
    return list(mods)

"""A Llama-style transformer that loads Hugging Face checkpoints as a same-key copy.

    from model import load_model, generate
    model = load_model("path/to/SmolLM2-135M-Instruct")          # dir, .safetensors or index.json
    logits = model(torch.tensor([[1, 2, 3]]))                     # (B, T, V)
    new = generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=20, eos_ids=[2])

Parameter names mirror transformers' LlamaForCausalLM exactly (model.layers.0.self_attn.q_proj.weight,
...) and RoPE uses the rotate-half layout, so `model.safetensors` loads without renaming and every
adapter or Fisher basis computed here comes out in Hugging Face order.

Notation used in shape comments:
    B batch, T time (query length), S key length (cache), C hidden size, V vocabulary,
    nh query heads, nkv key/value heads, hd head dim, F MLP intermediate size.

RoPE layouts. Meta's original checkpoints rotate interleaved pairs (x[2i], x[2i+1]); Hugging Face
rotates halves (x[i], x[i + hd/2]). The two are the same function after permuting the output rows
of q_proj and k_proj inside each head. To bring Meta weights here, apply per weight W (nh*hd, C):
    W.view(nh, hd // 2, 2, C).transpose(1, 2).reshape(nh * hd, C)
(with nkv instead of nh for k_proj). This file only ever uses the rotate-half layout.
"""

import contextlib
import functools
import hashlib
import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.utils.checkpoint import checkpoint


# ----------------------------------------------------------------------------- config

@dataclass
class ModelConfig:
    vocab_size: int = 128                   # V
    hidden_size: int = 64                   # C
    intermediate_size: int = 128            # F, SwiGLU width
    num_hidden_layers: int = 2              # transformer blocks
    num_attention_heads: int = 4            # nh
    num_key_value_heads: int | None = None  # nkv (GQA); None means nh
    head_dim: int | None = None             # hd; None means C // nh
    rms_norm_eps: float = 1e-5              # RMSNorm epsilon
    rope_theta: float = 10000.0             # RoPE base
    rope_scaling: dict | None = None        # None or {"rope_type": "llama3", "factor", ...}
    max_position_embeddings: int = 2048     # context the checkpoint was trained for
    tie_word_embeddings: bool = False       # lm_head shares embed_tokens' weight
    initializer_range: float = 0.02         # std of the random init (training from scratch)
    bos_token_id: int | None = None         # carried through to config.json
    eos_token_id: int | list | None = None  # carried through to config.json

    def __post_init__(self):
        """Fills the defaults and refuses a shape the model cannot have, naming the field (ValueError)."""
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        sizes = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads") + (() if self.head_dim is None else ("head_dim",))
        for key in sizes:
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"field {key!r} is missing (or null)" if v is None else
                                 f"field {key!r} = {v!r}: expected a positive integer")
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(f"field 'hidden_size' = {self.hidden_size} is not a multiple of "
                                 f"'num_attention_heads' = {self.num_attention_heads} (and no 'head_dim' is given)")
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"field 'num_attention_heads' = {self.num_attention_heads} is not a multiple of "
                             f"'num_key_value_heads' = {self.num_key_value_heads} (each KV head serves a whole group)")
        if self.head_dim % 2:
            raise ValueError(f"field 'head_dim' = {self.head_dim} is odd: RoPE rotates pairs of channels")

    @classmethod
    def from_hf(cls, path) -> "ModelConfig":
        """Read a Hugging Face config.json (a file, or a directory holding one): the checkpoint is
        the source of truth. Anything this implementation would compute differently is refused."""
        path = Path(path)
        file = path / "config.json" if path.is_dir() else path
        if not file.is_file():
            raise ValueError(f"{file}: not found (a Hugging Face config.json must sit beside the checkpoint)")
        try:
            hf = json.loads(file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{file}: not valid JSON ({e})") from None

        def refuse(key, value, why):
            raise ValueError(f"{file}: field {key!r} = {value!r} is not supported: {why}")

        model_type = hf.get("model_type", "llama")
        if model_type != "llama":
            refuse("model_type", model_type, "only Llama-architecture checkpoints are implemented")
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            refuse("hidden_act", act, "the MLP is SwiGLU (silu)")
        for key in ("attention_bias", "mlp_bias"):
            if hf.get(key, False):
                refuse(key, hf[key], "linear layers have no bias here")
        if hf.get("attention_dropout", 0.0):
            refuse("attention_dropout", hf["attention_dropout"], "attention has no dropout here (LoRA's own "
                   "dropout is --lora-dropout); set it to 0.0 to train without it")

        # rope_theta lives at the top level (transformers 4.x) or inside rope_parameters (5.x);
        # scaling is under rope_scaling or rope_parameters, its kind under "rope_type" or "type".
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type == "default":
            scaling = None
        elif rope_type == "llama3":
            keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
            missing = [k for k in keys if k not in rope]
            if missing:
                raise ValueError(f"{file}: llama3 rope scaling lacks field(s) {missing}")
            scaling = {"rope_type": "llama3", **{k: rope[k] for k in keys}}
        else:
            refuse("rope_type", rope_type, "only default and llama3 RoPE are implemented")

        kwargs = dict(
            vocab_size=hf.get("vocab_size"),
            hidden_size=hf.get("hidden_size"),
            intermediate_size=hf.get("intermediate_size"),
            num_hidden_layers=hf.get("num_hidden_layers"),
            num_attention_heads=hf.get("num_attention_heads"),
            num_key_value_heads=hf.get("num_key_value_heads"),
            head_dim=hf.get("head_dim"),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=scaling,
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            initializer_range=hf.get("initializer_range", 0.02),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
        )
        try:  # __post_init__ checks the sizes (a missing one is None) and the shape; its error gets the file name
            return cls(**kwargs)
        except ValueError as e:
            raise ValueError(f"{file}: {e}") from None

    def to_hf(self) -> dict:
        """The config.json that transformers' LlamaForCausalLM reads back as this model."""
        hf = {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
            "attention_bias": False, "mlp_bias": False, "torch_dtype": "float32",
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads, "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim, "rms_norm_eps": self.rms_norm_eps, "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling, "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings, "initializer_range": self.initializer_range,
        }
        if self.bos_token_id is not None:
            hf["bos_token_id"] = self.bos_token_id
        if self.eos_token_id is not None:
            hf["eos_token_id"] = self.eos_token_id
        return hf


# ----------------------------------------------------------------------------- RoPE

def rope_inv_freq(cfg: ModelConfig, device=None) -> torch.Tensor:
    """Inverse frequencies theta^(-2i/hd), i < hd/2, with llama3's piecewise rescaling if set."""
    hd = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64, device=device).float() / hd))
    s = cfg.rope_scaling
    if s is None:
        return inv_freq
    # llama3: long wavelengths are slowed down by `factor`, short ones kept, the band between
    # interpolated smoothly, so that context extends without disturbing local attention.
    old_ctx = s["original_max_position_embeddings"]
    low_wavelen = old_ctx / s["low_freq_factor"]
    high_wavelen = old_ctx / s["high_freq_factor"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s["factor"], inv_freq)
    smooth = (old_ctx / wavelen - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])
    smoothed = (1 - smooth) * scaled / s["factor"] + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_cos_sin(inv_freq: torch.Tensor, position_ids: torch.Tensor):
    """cos, sin of shape (B, T, hd) in fp32 for integer positions (B, T)."""
    freqs = position_ids[..., None].float() * inv_freq  # (B, T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)             # (B, T, hd), rotate-half layout
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, n, T, hd) rotated by position, in the dtypes of x and cos, sin (Llama.forward rounds those to the
    hidden states' dtype): transformers' arithmetic, bf16 in a bf16 model. (Rotating in fp32 instead took 3%
    more of a bf16 LoRA step on the small bench shape.)"""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)            # rotate_half
    return x * cos[:, None] + rotated * sin[:, None]  # cos, sin (B, 1, T, hd)


# ----------------------------------------------------------------------------- modules

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # x·rsqrt(mean(x²) + eps) in fp32, then the weight multiplies after casting back, as transformers does.
        # F.rms_norm without a weight is that formula bit for bit (values and gradients, fp32/bf16/fp16, tests/),
        # in one call where the Python form made six: 4% of a decode step on the small bench shape
        return self.weight * F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.nh, self.nkv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        C = cfg.hidden_size
        self.q_proj = nn.Linear(C, self.nh * self.hd, bias=False)
        self.k_proj = nn.Linear(C, self.nkv * self.hd, bias=False)
        self.v_proj = nn.Linear(C, self.nkv * self.hd, bias=False)
        self.o_proj = nn.Linear(self.nh * self.hd, C, bias=False)

    def forward(self, x, cos, sin, mask=None, cache=None, cache_pos=0):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.nh, self.hd).transpose(1, 2)   # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)  # (B, nkv, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k_cache, v_cache = cache                                       # (B, nkv, Tmax, hd) each
            k_cache[:, :, cache_pos:cache_pos + T] = k
            v_cache[:, :, cache_pos:cache_pos + T] = v
            k, v = k_cache[:, :, :cache_pos + T], v_cache[:, :, :cache_pos + T]  # (B, nkv, S, hd)
        # no mask means plain causal attention (training, right padding): SDPA's fused path
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           enable_gqa=self.nkv != self.nh)  # (B, nh, T, hd)
        y = y.transpose(1, 2).reshape(B, T, self.nh * self.hd)             # (B, T, nh*hd)
        return self.o_proj(y)


class SwiGLU(torch.autograd.Function):
    """silu(g) * u that keeps only g and u for backward and recomputes silu(g) there: autograd would keep
    g, silu(g) and u, three (B, T, F) tensors per layer, the largest activations of a Llama block.
    Same values and gradients as F.silu(g) * u (tests/test_model.py checks against autograd and gradcheck)."""

    @staticmethod
    def forward(ctx, g, u):
        ctx.save_for_backward(g, u)
        return F.silu(g) * u

    @staticmethod
    def backward(ctx, dy):
        g, u = ctx.saved_tensors
        du = dy * F.silu(g) if ctx.needs_input_grad[1] else None
        dg = torch.ops.aten.silu_backward(dy * u, g) if ctx.needs_input_grad[0] else None  # silu'(g)·(dy u)
        return dg, du


def swiglu(g, u):
    if torch.is_grad_enabled() and (g.requires_grad or u.requires_grad):
        return SwiGLU.apply(g, u)
    return F.silu(g) * u


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask=None, cache=None, cache_pos=0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, cache_pos)
        return x + self.mlp(self.post_attention_layernorm(x))


def _call(layer: nn.Module, *args):
    return layer(*args)


@functools.cache
def compiled_block():
    """`layer(x, cos, sin, mask)` through torch.compile with dynamic shapes: a block's norms, RoPE, SwiGLU and
    residual adds fused into a few kernels, forward and backward (Llama.compile_blocks, train.py --compile).
    The layer is an argument, so its weights are inputs of the graph and one compilation serves every layer
    but the first, whose input (the frozen embedding's output) needs no gradient: two graphs per model,
    dtype and set of adapted modules. A batch of one row, or a first batch whose length equals a width of the
    model (dynamo gives equal sizes one symbol), compiles once more.

    Every model of the process shares _call's compiled graphs, and dynamo runs a function eagerly, with one
    warning, once it holds recompile_limit of them (8 by default): a process that trains several dtypes or
    target sets (tests/cuda_check.py, the test suite) would fall back. The limit is raised here, under its old
    name cache_size_limit: recompile_limit since torch 2.7, an alias of it there. (Measured on torch 2.13.)"""
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    return torch.compile(_call, dynamic=True)


class Transformer(nn.Module):
    """The body: transformers' LlamaModel (embed_tokens, layers, norm)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Llama(nn.Module):
    """transformers' LlamaForCausalLM: `model` (the body) and `lm_head`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Transformer(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self._inv_freq = None  # RoPE inverse frequencies, a plain attribute: not in the state dict, no dtype cast
        # activation checkpointing: in training, keep only each block's input and recompute the block in
        # backward (memory of activations / number of layers, about one more forward of compute)
        self.gradient_checkpointing = False
        # the training forward's blocks through compiled_block (train.py --compile); evaluation, generation and
        # the Fisher's eval-mode passes stay eager, so they compile nothing
        self.compile_blocks = False

    def forward(self, input_ids, position_ids=None, mask=None, cache=None, cache_pos=0, hidden_only=False):
        """input_ids (B, T) -> logits (B, T, V), or with hidden_only the final normed hidden states
        (B, T, C), so that a caller applies lm_head only where it needs logits (labelled positions in
        training, the last position in generation): with a large vocabulary that is most of the work.

        position_ids (B, T) default to cache_pos + arange(T). mask (B, 1, T, S) bool, True where a
        query may attend a key (or already additive, 0 / -inf in the compute dtype); None means causal
        (no padding on the left): the query at cache_pos + t sees keys 0 .. cache_pos + t, cached ones included.
        cache: per layer a (k, v) pair of (B, nkv, Tmax, hd) tensors, written at cache_pos; S = cache_pos + T.
        """
        B, T = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(cache_pos, cache_pos + T, device=input_ids.device).expand(B, T)
        if self._inv_freq is None or self._inv_freq.device != input_ids.device:
            self._inv_freq = rope_inv_freq(self.config, input_ids.device)  # (hd/2,), computed once per device
        x = self.model.embed_tokens(input_ids)  # (B, T, C)
        cos, sin = (t.to(x.dtype) for t in rope_cos_sin(self._inv_freq, position_ids))  # (B, T, hd), fp32 angles
        if mask is None and cache is not None and cache_pos > 0:
            # SDPA's is_causal aligns the triangle top-left (query t sees keys <= t), which is wrong once
            # cached keys come first: query t sits at cache_pos + t
            mask = torch.ones(T, cache_pos + T, dtype=torch.bool, device=input_ids.device).tril(cache_pos)  # (T, S)
        if mask is not None and mask.dtype == torch.bool:
            # once here rather than inside every layer's attention: 0 where a query may attend, -inf elsewhere
            mask = torch.zeros(mask.shape, dtype=x.dtype, device=x.device).masked_fill_(~mask, float("-inf"))
        training = self.training and torch.is_grad_enabled() and cache is None
        block = compiled_block() if self.compile_blocks and training else _call
        for i, layer in enumerate(self.model.layers):
            if training and self.gradient_checkpointing:  # the RNG state is replayed: dropout draws the same masks
                x = checkpoint(block, layer, x, cos, sin, mask, use_reentrant=False)
            elif training:
                x = block(layer, x, cos, sin, mask)
            else:
                x = layer(x, cos, sin, mask, None if cache is None else cache[i], cache_pos)
        x = self.model.norm(x)
        return x if hidden_only else self.lm_head(x)  # (B, T, C) or (B, T, V)


def logits_at(model: Llama, input_ids: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """(N, V) logits at the N positions where keep (B, T) is True, row by row: lm_head runs there only, where
    model(input_ids) forms all (B, T, V), with a large vocabulary most of the work. Training's Fisher forward
    and eval.py's likelihoods take their logits this way."""
    return model.lm_head(model(input_ids, hidden_only=True)[keep])


def init_weights(model: Llama, seed: int = 0) -> Llama:
    """Random initialisation for training from scratch: N(0, initializer_range) for linear and
    embedding weights (as transformers does), ones for norms. The draws are made on the model's device (a CPU
    model's weights do not depend on the device a copy later moves to; a model built on a GPU draws there, seconds
    for a billion weights where a CPU's draws took minutes)."""
    device = next(model.parameters()).device
    g = torch.Generator(device).manual_seed(seed)
    std = model.config.initializer_range
    for name, p in model.named_parameters():
        with torch.no_grad():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g, device=device) * std)
    return model


# ----------------------------------------------------------------------------- checkpoints

def resolve_checkpoint(path) -> tuple[Path, list[Path]]:
    """(directory holding config.json, safetensors shard files) for a .safetensors file, a sharded
    model.safetensors.index.json, or a directory holding either."""
    path = Path(path)
    if path.is_dir():
        if (path / "model.safetensors").is_file():
            path = path / "model.safetensors"
        elif (path / "model.safetensors.index.json").is_file():
            path = path / "model.safetensors.index.json"
        else:
            raise ValueError(f"{path}: no model.safetensors or model.safetensors.index.json in this directory")
    if not path.is_file():
        raise ValueError(f"{path}: checkpoint not found")
    if path.name.endswith(".index.json"):
        try:
            weight_map = json.loads(path.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: not a safetensors index (needs a 'weight_map' object): {e}") from None
        shards = [path.parent / f for f in dict.fromkeys(weight_map.values())]
        for shard in shards:
            if not shard.is_file():
                raise ValueError(f"{path}: shard {shard.name} listed in weight_map does not exist")
        return path.parent, shards
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: expected a .safetensors file, an .index.json or a directory")
    return path.parent, [path]


def present(folder: Path, names) -> list[Path]:
    """The files of `names` that exist in folder."""
    return [folder / n for n in names if (folder / n).is_file()]


def file_digest(paths) -> str:
    """sha256 of the files' contents, in order: the same files wherever they lie, however their paths are spelled."""
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                h.update(chunk)
    return h.hexdigest()


def checkpoint_digest(path) -> str:
    """file_digest of what decides the model, its tokens and its chat template: every safetensors shard, then
    config.json and the TOKENIZER_FILES beside them (those present). train.py records it with a run (--resume
    compares it) and in the adapter's alignguard.json; eval.py compares an adapter's with --ckpt's."""
    folder, shards = resolve_checkpoint(path)
    return file_digest([*shards, *present(folder, ["config.json", *TOKENIZER_FILES])])


def _open_shard(shard: Path):
    """safe_open, with a ValueError that names the shard when it is not a safetensors file (a truncated download)"""
    try:
        return safe_open(str(shard), framework="pt", device="cpu")
    except SafetensorError as e:
        raise ValueError(f"{shard}: not a readable safetensors file ({e})") from None


# tensors that some checkpoints carry and this model recomputes instead
IGNORED_KEY_SUFFIXES = (".rotary_emb.inv_freq",)


def check_device(device: str) -> str:
    """A --device value: auto, cpu, cuda or cuda:N, what this code places models and autocasts on."""
    if not (device in ("auto", "cpu", "cuda") or device.startswith("cuda:") and device[5:].isascii()
            and device[5:].isdigit()):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}")
    return device


def check_cuda(device: str):
    """A CUDA --device that this torch build and machine have (torch would fail with an AssertionError)."""
    if not torch.cuda.is_available():
        raise ValueError(f"--device {device}: this torch build or machine has no CUDA device")
    if device.startswith("cuda:") and int(device[5:]) >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def load_model(path, device="cpu", dtype=torch.float32) -> Llama:
    """Build the model from config.json beside the checkpoint and copy every tensor by name.

    Key sets and shapes are checked: missing and unexpected tensors are named in the error.
    Floating tensors are cast to `dtype`; a tensor that cannot be cast (an integer weight) is an error.
    """
    folder, shards = resolve_checkpoint(path)
    cfg = ModelConfig.from_hf(folder)
    with torch.device("meta"):
        model = Llama(cfg)
    expected = {k: v for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight")

    state = {}
    for shard in shards:
        with _open_shard(shard) as f:
            for key in f.keys():
                if key.endswith(IGNORED_KEY_SUFFIXES) or (cfg.tie_word_embeddings and key == "lm_head.weight"):
                    continue
                if key not in expected:
                    state[key] = None  # collected to report all unexpected keys at once
                    continue
                t = f.get_tensor(key)
                if tuple(t.shape) != tuple(expected[key].shape):
                    raise ValueError(f"{shard}: tensor {key} has shape {tuple(t.shape)}, "
                                     f"config.json implies {tuple(expected[key].shape)}")
                if not t.is_floating_point():
                    raise ValueError(f"{shard}: tensor {key} has dtype {t.dtype}, which cannot be cast to {dtype}")
                state[key] = t.to(device=device, dtype=dtype)
    unexpected = sorted(k for k, v in state.items() if v is None)
    missing = sorted(set(expected) - set(state))
    if unexpected or missing:
        raise ValueError(f"{folder}: checkpoint does not match config.json: "
                         f"missing tensors {missing[:10]}{' ...' if len(missing) > 10 else ''}, "
                         f"unexpected tensors {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}")
    if cfg.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if cfg.tie_word_embeddings:  # assign=True replaced the shared Parameter by two; share again
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


def normal_file_mode(path):
    """Gives a written file the mode the umask gives a new one: mkstemp and safetensors' save_file make
    their files private (0600), which other users and a serving process could not read."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _atomic_write(path: Path, write):
    """Write through a temporary file in the same directory, then rename over `path`."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        normal_file_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


# copied beside a saved checkpoint from its source, when present
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "chat_template.json"]


def save_model(model: Llama, out_dir, state_dict: dict | None = None, tokenizer_from=None,
               overwrite: bool = False, dtype: torch.dtype | None = None) -> Path:
    """Write model.safetensors + config.json (and copy tokenizer files from `tokenizer_from`) so
    that transformers' LlamaForCausalLM.from_pretrained(out_dir) loads it. `state_dict` overrides
    the model's own (e.g. a merged LoRA state dict); a tied model whose lm_head.weight there differs from
    embed_tokens (LoRA merged into a tied lm_head) is written untied. Without `overwrite` it refuses a directory
    that already holds a checkpoint or any file it would write (a sharded checkpoint beside a new
    model.safetensors would lose to it in every loader)."""
    out = Path(out_dir)
    if not overwrite and out.is_dir():
        names = ["config.json", "*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin"]
        held = sorted({p.name for pat in names + (TOKENIZER_FILES if tokenizer_from else []) for p in out.glob(pat)})
        if held:
            raise ValueError(f"{out}: already holds {', '.join(held)}; refusing to overwrite a checkpoint "
                             "(choose another directory)")
    out.mkdir(parents=True, exist_ok=True)
    sd = model.state_dict() if state_dict is None else state_dict
    # tied only while lm_head still equals embed_tokens: a merged LoRA adapter on a tied lm_head unties them
    tied = model.config.tie_word_embeddings and (
        "lm_head.weight" not in sd or torch.equal(sd["lm_head.weight"], sd["model.embed_tokens.weight"]))
    tensors = {}
    for k, v in sd.items():
        if tied and k == "lm_head.weight":
            continue  # transformers re-ties it from embed_tokens
        v = v.detach().to("cpu")
        tensors[k] = (v.to(dtype) if dtype is not None else v).contiguous()
    _atomic_write(out / "model.safetensors", lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    hf = model.config.to_hf()
    hf["tie_word_embeddings"] = tied
    hf["torch_dtype"] = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    _atomic_write(out / "config.json", lambda p: Path(p).write_text(json.dumps(hf, indent=2) + "\n"))
    if tokenizer_from is not None:
        for src in present(Path(tokenizer_from), TOKENIZER_FILES):
            data = src.read_bytes()
            _atomic_write(out / src.name, lambda p: Path(p).write_bytes(data))
    return out


# ----------------------------------------------------------------------------- generation

@contextlib.contextmanager
def decode_layout(model: Llama):
    """Inside the block, each projection weight W (d_out, d_in) of a CPU fp32 model (q, k, v, o, gate, up, down,
    lm_head) is stored as the transposed view of a contiguous (d_in, d_out) tensor; after it, contiguous again.
    The values and shapes stay (the state dict and saved checkpoints read the same); the strides change, and
    with them the summation order of the products inside the block (the last bits of the outputs, as between
    batch sizes); after it the outputs are the same bits as before. Merged LoRA weights formed inside the block
    (alignguard.merged_lora) take W0's layout. Why: a decode step multiplies a few rows of x by Wᵀ, and MKL's
    fp32 product is slow for few rows when Wᵀ is a transposed view (nn.Linear's layout), not when it is
    contiguous. Measured on the development machine, torch 2.13, 2 threads, x @ Wᵀ for 4 rows of x: 576 x 576
    291 -> 24 µs, 1536 x 576 177 -> 89 µs, 49152 x 576 12.5 -> 10.0 ms; 32 rows 1.7-2.6x; 256 rows 1.01-1.08x
    and one row 0.89-1.27x. Wrap a series of generate calls in it (eval.score_driftcheck does): entering and
    leaving copy each weight once (one at a time; entering took 0.4-0.5 s at SmolLM2-135M's shape).

    Scoped rather than kept: a layout that outlived the block would reach training, where hand-written
    all_reduce of gradients across processes reads raw memory (ranks in different layouts would sum wrong
    elements), and CUDA after model.to(). Inside the block the weights are not contiguous (.view(-1) on them
    fails), and they get new storage on the way in and out, so a tensor taken from the state dict before it
    no longer aliases them. Only fp32 outside autocast, on a CPU: bf16 products, and autocast's bf16 copies
    of fp32 weights, measured no faster in this layout (lm_head 0.77x), fp64 and CUDA were not measured.
    A tied lm_head is embed_tokens' weight, so the embedding's lookups read strided rows inside the block
    (a reviewer measured 37.7 against 2.8 ms for 8,192 tokens at SmolLM2's shape: small next to decoding)."""
    lins = [model.lm_head]
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        lins += [a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj]
    changed = {}
    if next(model.parameters()).device.type == "cpu" and not torch.is_autocast_enabled("cpu"):
        changed = {id(lin.weight): lin.weight for lin in lins
                   if lin.weight.dtype == torch.float32 and lin.weight.is_contiguous()}
    # plain tensors even when entered under torch.inference_mode, whose tensors could not be trained afterwards
    with torch.inference_mode(False), torch.no_grad():
        for W in changed.values():
            W.data = W.data.t().contiguous().t()  # (d_out, d_in), strides (1, d_out)
    try:
        yield model
    finally:
        with torch.inference_mode(False), torch.no_grad():
            for W in changed.values():
                W.data = W.data.contiguous()


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, generator=None) -> torch.Tensor:
    """Next token per row of logits (B, V): argmax when temperature == 0, else nucleus sampling."""
    if not temperature >= 0 or not 0 <= top_p <= 1:  # `not >=` also refuses NaN
        raise ValueError(f"temperature must be >= 0 and top_p in [0, 1], got {temperature} and {top_p}")
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, idx = probs.sort(dim=-1, descending=True)
        # drop a token when the mass before it already reaches top_p (the top token always stays)
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p
        drop[..., 0] = False
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, idx, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: Llama, prompts: list[list[int]], max_new_tokens: int, eos_ids, pad_id: int = 0,
             temperature: float = 0.0, top_p: float = 1.0, generator=None) -> list[list[int]]:
    """Continue a batch of token-id prompts of different lengths; return only the new tokens of
    each, stopping at (and not including) the first of `eos_ids` (an id, a list, set or tensor of ids,
    or None for no stop token).

    Prompts are left-padded: positions count from each prompt's first real token and pad keys are
    masked out, so every row computes what it would alone. The KV cache is allocated here, per call,
    on the model's device, sized prompt + max_new_tokens.

    Greedy decoding drops finished rows from the batch: once a quarter of the rows still running have
    stopped, the cache (layer by layer) and the per-row state keep only the unfinished rows, so that a
    batch of short refusals and long answers does not compute the refusals' rows to the end (SmolLM2-135M
    on a CPU, 64 prompts in batches of 32 stopping at their first sentence: 18.2 s -> 13.1 s). Each row
    computes the same as before; a smaller batch can change the last bits of its logits, as between a
    batch and a prompt alone, so only an argmax near-tie could differ. Sampling keeps the whole batch:
    there every step draws for all B rows, so a seeded row does not depend on when the others stop.

    On a CPU, a series of calls runs faster inside `with decode_layout(model):` (fp32: SmolLM2-135M-Instruct's
    DRIFTCHECK 1.37-1.41x, README: Performance).
    """
    cfg = model.config
    p = next(model.parameters())
    device, dtype = p.device, p.dtype
    B, P = len(prompts), max(len(x) for x in prompts)
    Tmax = P + max_new_tokens
    ids = torch.full((B, P), pad_id, dtype=torch.long, device=device)
    valid = torch.zeros(B, Tmax, dtype=torch.bool, device=device)  # real (non-pad) key positions
    for b, x in enumerate(prompts):
        assert len(x) > 0, f"prompt {b} is empty"
        ids[b, P - len(x):] = torch.tensor(x, device=device)
        valid[b, P - len(x):] = True
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)  # (B, Tmax)
    cache = [(torch.zeros(B, cfg.num_key_value_heads, Tmax, cfg.head_dim, device=device, dtype=dtype),
              torch.zeros(B, cfg.num_key_value_heads, Tmax, cfg.head_dim, device=device, dtype=dtype))
             for _ in range(cfg.num_hidden_layers)]
    if eos_ids is None:
        eos_ids = []
    elif isinstance(eos_ids, torch.Tensor):
        eos_ids = eos_ids.flatten().tolist()
    elif not isinstance(eos_ids, (list, tuple, set, frozenset)):  # one id: an int, a numpy integer
        eos_ids = [int(eos_ids)]
    eos = torch.tensor(sorted(set(eos_ids)), dtype=torch.long, device=device)

    # prefill: causal mask over the prompt, pad keys hidden; a pad query may see itself so that
    # no softmax row is empty (an empty row would give NaN that leaks into later layers)
    causal = torch.ones(P, P, dtype=torch.bool, device=device).tril()
    mask = (causal & valid[:, None, :P]) | torch.eye(P, dtype=torch.bool, device=device)  # (B, P, P)
    h = model(ids, position_ids=positions[:, :P], mask=mask[:, None], cache=cache, cache_pos=0, hidden_only=True)
    logits = model.lm_head(h[:, -1])  # (B, V): only the last prompt position predicts

    out = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
    rows = torch.arange(B, device=device)  # the prompt each row of the running batch belongs to
    done = torch.zeros(B, dtype=torch.bool, device=device)
    for t in range(P, Tmax):
        nxt = sample_next(logits, temperature, top_p, generator)  # (b,), b rows still in the batch
        nxt = torch.where(done, pad_id, nxt)
        out[rows, t - P] = nxt
        done |= torch.isin(nxt, eos)
        n_done = int(done.sum())
        if n_done == len(rows) or t == Tmax - 1:
            break
        if temperature == 0 and 4 * n_done >= len(rows):  # drop the finished rows: later steps cost less
            keep = (~done).nonzero().squeeze(1)  # (b',)
            rows, nxt, done, valid, positions = rows[keep], nxt[keep], done[keep], valid[keep], positions[keep]
            for i, (k, v) in enumerate(cache):  # one layer at a time: the old cache is freed as the new one grows
                cache[i] = (k[keep], v[keep])
        logits = model(nxt[:, None], position_ids=positions[:, t:t + 1],
                       mask=valid[:, None, None, :t + 1], cache=cache, cache_pos=t)[:, -1]  # (b, V)
    stops, result = set(eos.tolist()), []
    for row in out.tolist():
        stop = next((i for i, tok in enumerate(row) if tok in stops), len(row))
        result.append(row[:stop])
    return result

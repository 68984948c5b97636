"""Speed and memory of our stack (model.py + alignguard.py + train.py's loss) next to transformers + peft,
on the same random-weight Llama, in one run on one machine. Every number is the median of several
repetitions after warm-up; every ratio is ours / theirs.

    python tests/bench.py --shape small --quick                 # ~10M params, a few minutes on 2 CPU cores
    python tests/bench.py --shape smollm --json bench.json      # SmolLM2-135M shape, fp32 and bf16
    python tests/bench.py --shape 1b --device cuda --dtype bf16 --no-eigh  # Llama-3.2-1B shape, MFU on a GPU
    python tests/bench.py --shape small --dtype fp32 --profile  # + torch.profiler table of our step
    python tests/bench.py --shape small --compile               # + our step with compiled blocks (train.py --compile)
    python tests/bench.py --scaling                             # ours: step vs T and r, AlignGuard vs width and grad-accum
    python tests/bench.py --shape tiny --quick                  # ~1 min per dtype: checks the script runs; figures mean nothing

What is measured, per shape and dtype (fp32, or bf16: base weights in bf16 under autocast, LoRA in fp32,
as train.py --dtype bf16 does):
  - LoRA training step (forward, backward, AdamW on the LoRA parameters), tokens/s and peak memory, r = 8,
    alpha = 16, no dropout, targets q,k,v,o and all-linear. Ours: add_lora, model(input_ids),
    train.normalised_loss(train.token_loss_sum(...)). Theirs: peft.get_peft_model(LoraConfig(...)),
    model(input_ids, use_cache=False).logits and the same loss. The tokens/s ratio comes from one process
    holding both stacks, their steps alternating within every repetition (so a busy neighbour slows both
    alike); each (stack, targets, dtype) also runs alone in its own subprocess for its memory, the peak over
    its steps: on CPU the RSS high-water mark above the RSS after setup (malloc_trim, then a reset through
    /proc/self/clear_refs) over the warm-up steps and two more, in a process where every allocation of
    64 KiB or more is mapped on its own (MALLOC_MMAP_THRESHOLD_=65536), so freed memory leaves at once and
    the peak is that of live allocations, the same in every run; on CUDA torch.cuda.max_memory_allocated
    above the allocation after setup, over all the plain steps of measure_train;
  - the AlignGuard step (plain step + alignguard.penalties, random orthonormal Fisher basis, k = 32 per
    module, r = 8) against our plain step, for q,k,v,o (the default targets) and all-linear: overhead; goal <= 10%;
  - alignguard.estimate_fisher (all-linear) on one batch against one plain step (goal <= 2x), split into the per-batch
    K-FAC accumulation (kfac_factors) and the eigendecompositions, done once per run whatever the number
    of batches (--no-eigh skips them: minutes at the 1b shape's d = 8192);
  - batched greedy generation (left-padded prompts of different lengths, eos disabled so every row makes
    max_new_tokens): model.generate against transformers' generate, tokens/s, and whether the tokens agree;
  - our all-linear step with activation checkpointing (train.py --grad-checkpoint) against theirs without:
    tokens/s (each alone in its process) and peak memory;
  - with --compile, our step with its blocks through torch.compile (train.py --compile, model.compiled_block)
    against our eager step and theirs, the three interleaved in one process, for both target sets: tokens/s,
    the first step's time (compiling) and peak memory;
  - the matmul peak of the machine (one large torch.mm) and the FLOP/s our LoRA step achieves.

transformers and peft are optional: without them only our own measurements run.
"""

import argparse
import ctypes
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: model.py, alignguard.py, train.py

from alignguard import (AlignGuardConfig, FisherBasis, LoRAConfig, add_lora, estimate_fisher, kfac_factors,  # noqa: E402
                        lora_modules, lora_parameters, penalties)
from model import Llama, ModelConfig, decode_layout, generate, init_weights  # noqa: E402
from train import batch_loss_sum, labelled_logits, normalised_loss, token_loss_sum  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TARGETS = {"qkvo": ("q_proj", "k_proj", "v_proj", "o_proj"), "all-linear": "all-linear"}
GOALS = {"train": 1.3, "memory": 0.8, "alignguard": 0.10, "fisher": 2.0, "generate": 2.0}


@dataclass
class Shape:
    model: ModelConfig  # the random-weight model both stacks get
    batch: int  # B, rows per training step
    seq: int  # T, tokens per row
    gen_prompts: tuple[int, ...]  # prompt lengths of the generation batch (left-padded to the longest)
    gen_new: int  # max_new_tokens of generation
    cuda_only: bool = False  # too large for a CPU run
    check_only: bool = False  # checks that the script runs (tests/test_bench.py); its figures mean nothing


SHAPES = {
    # two layers of width 64: runs every measurement in seconds, for checking the script, not for its numbers
    "tiny": Shape(ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
                  batch=2, seq=32, gen_prompts=(12, 7), gen_new=6, check_only=True),
    # ~8.5M parameters: quick enough to iterate on with two CPU cores
    "small": Shape(ModelConfig(vocab_size=8192, hidden_size=256, intermediate_size=768, num_hidden_layers=8,
                               num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                               rope_theta=100000.0),
                   batch=4, seq=256, gen_prompts=(64, 48, 32, 16), gen_new=32),
    # HuggingFaceTB/SmolLM2-135M's config.json
    "smollm": Shape(ModelConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True,
                                rope_theta=100000.0, rms_norm_eps=1e-5, max_position_embeddings=8192),
                    batch=4, seq=256, gen_prompts=(64, 48, 32, 16), gen_new=32),
    # meta-llama/Llama-3.2-1B's config.json
    "1b": Shape(ModelConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                            num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
                            rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=131072,
                            rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
                batch=8, seq=2048, gen_prompts=(256, 192, 128, 64, 256, 192, 128, 64), gen_new=128, cuda_only=True),
}


# ----------------------------------------------------------------------------- helpers

def have_reference() -> str | None:
    """None when transformers and peft import, else the reason they do not."""
    try:
        import peft  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        return f"{e}; install them with `pip install transformers peft` to compare against them"
    return None


def cpuinfo_field(name: str, cpuinfo: str | None = None) -> str | None:
    """The first `name : value` of /proc/cpuinfo (or of the text given); None where there is none."""
    if cpuinfo is None:
        cpuinfo = Path("/proc/cpuinfo").read_text() if os.path.exists("/proc/cpuinfo") else ""
    return next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith(name)), None)


def env_header(device: str, threads: int) -> str:
    cpu = cpuinfo_field("model name") or platform.processor()
    versions = [f"torch {torch.__version__}"]
    for name in ("transformers", "peft"):
        try:
            versions.append(f"{name} {__import__(name).__version__}")
        except ImportError:
            versions.append(f"{name} missing")
    gpu = f" | {torch.cuda.get_device_name()}" if device == "cuda" else ""
    return f"# {' | '.join(versions)} | python {platform.python_version()} | threads {threads} | {cpu}{gpu}"


def native_bf16(cpuinfo: str | None = None) -> bool | None:
    """Whether the CPU computes bf16 natively (avx512_bf16 or AMX), from /proc/cpuinfo's flags (or those of
    the text given); None where it does not say."""
    flags = cpuinfo_field("flags", cpuinfo)
    return None if flags is None else bool({"avx512_bf16", "amx_bf16"} & set(flags.split()))


def sync(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def time_interleaved(fns: dict, reps: int, device: str) -> dict[str, list[float]]:
    """Seconds per call of each function, the functions alternating within every repetition so that a
    noisy neighbour slows all of them alike."""
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            times[k].append(timed(fn, device))
    return times


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def memory_reset(device: str) -> int:
    """Start a new high-water mark; returns the current usage in bytes (the baseline)."""
    gc.collect()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    try:  # hand freed heap memory back to the OS, or steps reuse what setup freed and look smaller
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current VmRSS
    return _proc_status_kib("VmRSS") * 1024


def memory_peak(device: str) -> int:
    """The high-water mark in bytes since memory_reset."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return _proc_status_kib("VmHWM") * 1024


def make_batch(cfg: ModelConfig, B: int, T: int, seed: int, device: str) -> dict:
    """Random tokens as chat SFT rows: a prompt of T/4..T/2 tokens without loss, then the response.
    labels are pre-shifted (labels[t] = input_ids[t + 1]), -100 on the prompt and the last position."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:]
    prompt = torch.randint(T // 4, T // 2 + 1, (B,), generator=g)
    labels[torch.arange(T)[None, :] < prompt[:, None] - 1] = -100
    return {"input_ids": ids.to(device), "labels": labels.to(device)}


def build_ours(shape: Shape, dtype: torch.dtype, device: str, seed: int) -> Llama:
    """The benchmark model: init_weights(seed) in fp32 on the device, then cast; both stacks start from these
    tensors. Built on the device itself: on a CPU a 1B model took 46 s to build and fill, and each bench worker
    builds one to three."""
    with torch.device(device):
        model = init_weights(Llama(shape.model), seed=seed)
    return model.to(dtype=dtype)


def build_theirs(shape: Shape, dtype: torch.dtype, device: str, seed: int):
    """transformers' LlamaForCausalLM (SDPA attention) holding exactly build_ours' weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device(device):  # its own random init on the device too (75 s on a CPU at the 1B shape)
        hf = LlamaForCausalLM(LlamaConfig(**shape.model.to_hf(), attn_implementation="sdpa"))
    hf.load_state_dict(build_ours(shape, torch.float32, device, seed).state_dict(), strict=True)
    assert hf.lm_head.weight is hf.model.embed_tokens.weight or not shape.model.tie_word_embeddings
    hf.generation_config.eos_token_id = None  # generation always runs to max_new_tokens
    hf.generation_config.pad_token_id = 0
    inv_freq = hf.model.rotary_emb.inv_freq.clone()
    hf = hf.to(device=device, dtype=dtype)
    hf.model.rotary_emb.inv_freq = inv_freq.to(device)  # fp32 RoPE frequencies, as from_pretrained(dtype=...) keeps them
    return hf


def random_basis(model, k: int, seed: int) -> dict[str, FisherBasis]:
    """A random orthonormal Fisher basis (k eigenvectors per factor) for every LoRA module: the penalties
    cost the same whatever the basis, so the benchmark does not need a real Fisher."""
    g = torch.Generator().manual_seed(seed)
    basis = {}
    for name, m in lora_modules(model).items():
        kg, ka = min(k, m.out_features), min(k, m.in_features)
        U_g = torch.linalg.qr(torch.randn(m.out_features, kg, generator=g)).Q
        U_a = torch.linalg.qr(torch.randn(m.in_features, ka, generator=g)).Q
        eg = torch.rand(kg, generator=g).sort(descending=True).values
        ea = torch.rand(ka, generator=g).sort(descending=True).values
        basis[name] = FisherBasis(U_g, eg, U_a, ea, n_tokens=1, w0_norm=m.weight.float().norm().item())
        basis[name] = basis[name].to(m.weight.device)
    return basis


def train_flops(cfg: ModelConfig, targets, r: int, B: int, T: int, n_loss: int | None = None) -> float:
    """FLOPs of one LoRA training step, counted as multiply-adds x 2:

        forward   2·N·BT + 2·N_lora·BT + 2·C·V·n     N = Σ d_in·d_out over the blocks' Linear weights,
        backward  2·N·BT + 4·N_lora·BT + 2·C·V·n     N_lora = Σ r·(d_in + d_out) over adapted modules
        attention 3 · L · B · 4·T²·nh·hd              QKᵀ and PV forward, twice that backward

    lm_head (C x V) counts at the n = n_loss labelled positions only (all B·T when None): the loss needs no
    other, ours computes no other, and transformers' logits at the rest are work this count does not credit.
    The frozen weights get no gradient (no third 2·N·BT); attention is counted over the full T x T as in
    PaLM's MFU, without the causal half; norms, activations, softmax, loss and the optimizer are not counted.
    The backward input gradient of the first adapted layer is counted although autograd may skip it.
    """
    C, F, L, V = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    linears = {"q_proj": (C, q), "k_proj": (C, kv), "v_proj": (C, kv), "o_proj": (q, C),
               "gate_proj": (C, F), "up_proj": (C, F), "down_proj": (F, C)}
    N = L * sum(i * o for i, o in linears.values())
    adapted = linears if targets == "all-linear" else {n: linears[n] for n in targets}
    N_lora = L * sum(r * (i + o) for i, o in adapted.values())
    attention = 3 * L * B * 4 * T * T * cfg.num_attention_heads * cfg.head_dim
    n = B * T if n_loss is None else n_loss
    return (4 * N + 6 * N_lora) * B * T + 4 * C * V * n + attention


def matmul_peak(dtype: torch.dtype, device: str, reps: int) -> float:
    """FLOP/s of one large square torch.mm: the best of `reps` after one warm-up (a peak is what the
    machine can do; a busy neighbour only ever lowers it). n is 8192 on a GPU; on a CPU 4096, or the first size
    from 512 up, doubling, whose product takes over a second: a CPU without fp16 (or bf16) arithmetic emulates
    it, fp16 at 0.5-1.3 GFLOP/s on one host (2026-12-03), where one 4096 product took minutes."""
    n, n_max = 512, 8192 if device == "cuda" else 4096
    while True:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        first = timed(lambda: torch.mm(a, b), device)  # the warm-up, and the probe of the size
        if n == n_max or (device != "cuda" and first > 1.0):
            break
        n *= 2
    times = [timed(lambda: torch.mm(a, b), device) for _ in range(reps)]
    return 2 * n**3 / min(times)


# ----------------------------------------------------------------------------- measurements (run in workers)

def task_shape(task: dict) -> Shape:
    """The task's shape, its width changed when the task names one ("hidden": C, heads of 64, MLP 3C)."""
    shape = SHAPES[task["shape"]]
    if "hidden" not in task:
        return shape
    C = task["hidden"]
    return replace(shape, model=replace(shape.model, hidden_size=C, intermediate_size=3 * C, head_dim=64,
                                        num_attention_heads=C // 64, num_key_value_heads=max(1, C // 128)))


def build_step(task: dict, stack: str):
    """(model, step, params, n_loss_tokens, batch) of one stack for the task's shape, dtype and targets:
    step(penalty=None) is one LoRA training step (forward, backward, AdamW); penalty() -> (total, terms) adds
    AlignGuard's."""
    shape, dtype, device = task_shape(task), DTYPES[task["dtype"]], task["device"]
    targets, r = TARGETS[task["targets"]], task.get("rank", 8)
    torch.manual_seed(task["seed"])
    batch = make_batch(shape.model, task["batch"], task["seq"], task["seed"], device)
    n_tokens = int((batch["labels"] != -100).sum())
    autocast = torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32)
    if stack == "ours":
        model = build_ours(shape, dtype, device, task["seed"])
        add_lora(model, LoRAConfig(r=r, alpha=2 * r, dropout=0.0, targets=targets))
        params = lora_parameters(model)
        model.gradient_checkpointing = task.get("grad_checkpoint", False)  # train.py --grad-checkpoint
        model.compile_blocks = task.get("compile", False)  # train.py --compile

        def loss_sum():  # exactly train.py's step: lm_head at labelled positions only
            return batch_loss_sum(model, batch["input_ids"], batch["labels"])
    else:
        import peft
        base = build_theirs(shape, dtype, device, task["seed"])
        model = peft.get_peft_model(base, peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, task_type="CAUSAL_LM",
                                                          target_modules=list(targets) if targets != "all-linear" else targets))
        params = [p for p in model.parameters() if p.requires_grad]

        def loss_sum():  # what a transformers + peft user runs: logits everywhere, the same token loss
            return token_loss_sum(model(input_ids=batch["input_ids"], use_cache=False).logits, batch["labels"])
    model.train()
    opt = torch.optim.AdamW(params, lr=1e-4)

    accum = task.get("accum", 1)  # train.py --grad-accum: micro-batches (here the same one) per optimizer step

    def step(penalty=None):
        for _ in range(accum):
            with autocast:
                loss = normalised_loss(loss_sum(), n_tokens * accum)
            loss.backward()
        if penalty is not None:  # as train.py: once per optimizer step, its own backward, in fp32 outside autocast
            penalty()[0].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return model, step, params, n_tokens, batch


def warm_and_time(steps: dict, task: dict) -> dict[str, list[float]]:
    """The task's warm-up steps of every stack, then its repetitions interleaved (time_interleaved)."""
    for _ in range(task["warmup"]):
        for step in steps.values():
            step()
    return time_interleaved(steps, task["reps"], task["device"])


def measure_pair(task: dict) -> dict:
    """Both stacks in one process, their steps alternating within every repetition: the tokens/s ratio is
    taken on the same machine state (a neighbour's load slows both alike), unlike step times measured in
    separate processes minutes apart."""
    steps = {stack: build_step(task, stack)[1] for stack in ("ours", "theirs")}
    return {f"{k}_s": v for k, v in warm_and_time(steps, task).items()}


def measure_compiled(task: dict) -> dict:
    """Our step with compiled blocks (train.py --compile), our eager step and, when installed, theirs, in one
    process, alternating; the compiled stack's first step, which compiles, timed on its own."""
    steps = {"eager": build_step(task, "ours")[1]}
    compiled = build_step({**task, "compile": True}, "ours")[1]
    out = {"compile_s": [timed(compiled, task["device"])]}
    steps["compiled"] = compiled
    if task.get("with_theirs"):
        steps["theirs"] = build_step(task, "theirs")[1]
    return {**out, **{f"{k}_s": v for k, v in warm_and_time(steps, task).items()}}


def measure_memory(task: dict) -> dict:
    """Peak memory of one stack's plain LoRA step, alone in its process: the high-water mark over the warm-up
    steps and two more. On a CPU train_cell runs it with every allocation of 64 KiB or more mapped on its own
    (MALLOC_MMAP_THRESHOLD_), so that freed memory goes back to the OS at once and the resident peak is the
    peak of live allocations: with glibc's default heap the same step (small, q,k,v,o, bf16) read 212-251 MiB
    in five runs, like this 154 MiB in each. With compiled blocks a throwaway model of the same task takes
    one step first, which compiles and loads the compiler and its kernels into the process (a one-off 90-116
    MiB on the small shape): the measured model then reuses the graphs, and its first step, with AdamW's
    state, counts as the eager stacks' does (graphs_in_peak: the graphs compiled after all, 0 expected)."""
    from torch._dynamo.utils import counters
    if task.get("compile"):
        build_step(task, task["stack"])[1]()
    graphs = counters["stats"]["unique_graphs"]
    model, step, *_ = build_step(task, task["stack"])
    baseline = memory_reset(task["device"])
    for _ in range(task["warmup"] + 2):
        step()
    return {"peak_bytes": memory_peak(task["device"]) - baseline,
            "graphs_in_peak": counters["stats"]["unique_graphs"] - graphs}


def measure_train(task: dict) -> dict:
    """One stack, one target set, one dtype, alone in its process: LoRA step time and peak memory; for ours also
    the AlignGuard step and, with all-linear targets, the Fisher estimation, interleaved with the plain step."""
    dtype, device = DTYPES[task["dtype"]], task["device"]
    model, step, params, n_tokens, batch = build_step(task, task["stack"])
    autocast = torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32)

    # the peak is taken over all plain steps: an allocator settles only after a few steps
    baseline = memory_reset(device)
    for _ in range(task["warmup"]):
        step()
    out = {"step_s": time_interleaved({"step": step}, task["reps"], device)["step"]}
    out.update(peak_bytes=memory_peak(device) - baseline, setup_bytes=baseline, n_loss_tokens=n_tokens,
               n_trainable=sum(p.numel() for p in params))
    if task["stack"] == "theirs" or task.get("grad_checkpoint"):
        return out

    # AlignGuard against plain steps taken alternately, so that both see the same machine
    basis, agc = random_basis(model, k=32, seed=task["seed"]), AlignGuardConfig(k=32)
    ag_step = lambda: step(penalty=lambda: penalties(model, basis, agc))  # noqa: E731
    ag_step()  # warm-up
    t = time_interleaved({"step": step, "ag_step": ag_step}, task["reps"], device)
    out["ag_plain_step_s"], out["ag_step_s"] = t["step"], t["ag_step"]
    if task["targets"] != "all-linear":  # the Fisher once, on the larger target set
        return out

    # estimate_fisher = kfac_factors (per batch) + one eigh per factor (once per run, seconds each at
    # d = 1536 on a CPU): the factors are timed like the steps, the whole estimation once
    gen = torch.Generator(device).manual_seed(task["seed"])
    with autocast:  # as train.py estimates it: under the run's autocast
        kfac = lambda: kfac_factors(model, [batch], kind="true", generator=gen, forward=labelled_logits)  # noqa: E731
        kfac()  # warm-up
        out["kfac_s"] = time_interleaved({"kfac": kfac}, task["reps"], device)["kfac"]
        if not task["no_eigh"]:
            out["fisher_s"] = [timed(lambda: estimate_fisher(model, [batch], k=32, kind="true", generator=gen,
                                                                forward=labelled_logits), device)]
    return out


def measure_generate(task: dict) -> dict:
    """Both stacks in one process, alternating: greedy generation tokens/s on the same left-padded prompts,
    the tokens each made, and the largest logit difference of a plain forward (the same weights?)."""
    shape, dtype, device = SHAPES[task["shape"]], DTYPES[task["dtype"]], task["device"]
    ours = build_ours(shape, dtype, device, task["seed"]).eval()
    theirs = build_theirs(shape, dtype, device, task["seed"]).eval()
    g = torch.Generator().manual_seed(task["seed"])
    prompts = [torch.randint(1, shape.model.vocab_size, (n,), generator=g).tolist() for n in shape.gen_prompts]
    P, new = max(shape.gen_prompts), task["gen_new"]
    ids = torch.zeros(len(prompts), P, dtype=torch.long)
    mask = torch.zeros(len(prompts), P, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, P - len(p):], mask[b, P - len(p):] = torch.tensor(p), 1
    ids, mask = ids.to(device), mask.to(device)
    with torch.no_grad():
        logit_diff = (ours(ids[:1]).float() - theirs(input_ids=ids[:1]).logits.float()).abs().max().item()

    result = {}

    def run_ours():
        result["ours"] = generate(ours, prompts, max_new_tokens=new, eos_ids=[-1], pad_id=0)

    def run_theirs():
        with torch.no_grad():
            out = theirs.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)
        result["theirs"] = out[:, P:].tolist()

    t0 = time.perf_counter()
    with decode_layout(ours):  # as eval.score_driftcheck generates: entered once, its copies timed apart
        layout_s = time.perf_counter() - t0
        run_ours(), run_theirs()  # warm-up
        t = time_interleaved({"ours": run_ours, "theirs": run_theirs}, task["reps"], device)
    a, b = result["ours"], result["theirs"]
    n_equal = sum(x == y for ra, rb in zip(a, b) for x, y in zip(ra, rb))
    return {"ours_s": t["ours"], "theirs_s": t["theirs"], "new_tokens": len(prompts) * new,
            "lengths_ours": [len(r) for r in a], "lengths_theirs": [len(r) for r in b],
            "tokens_equal": a == b, "n_equal": n_equal, "logit_max_diff": logit_diff, "layout_s": layout_s}


def measure_profile(task: dict) -> dict:
    """torch.profiler over a few of our LoRA steps, the ops sorted by self time."""
    from torch.profiler import ProfilerActivity, profile

    shape, dtype, device = SHAPES[task["shape"]], DTYPES[task["dtype"]], task["device"]
    torch.manual_seed(task["seed"])
    batch = make_batch(shape.model, task["batch"], task["seq"], task["seed"], device)
    n_tokens = int((batch["labels"] != -100).sum())
    model = build_ours(shape, dtype, device, task["seed"])
    add_lora(model, LoRAConfig(r=8, alpha=16, targets=TARGETS[task["targets"]]))
    opt = torch.optim.AdamW(lora_parameters(model), lr=1e-4)
    autocast = torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32)

    def step():
        with autocast:
            normalised_loss(batch_loss_sum(model, batch["input_ids"], batch["labels"]), n_tokens).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(task["warmup"]):
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(task["reps"]):
            step()
        sync(device)
    key = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    return {"table": prof.key_averages().table(sort_by=key, row_limit=20, max_name_column_width=55)}


WORKERS = {"train": measure_train, "memory": measure_memory, "pair": measure_pair, "compiled": measure_compiled,
           "generate": measure_generate, "profile": measure_profile}


def run_worker(task: dict, env: dict | None = None) -> dict | None:
    """Runs one measurement in a fresh Python process (its own memory high-water mark, no state left by
    another stack), with `env` added to its environment; returns its result, or None after printing why it
    failed or that it ran past task["timeout"] seconds (0: no limit). One line on stderr says when each worker
    is done, so a run stopped from outside still shows how far it got."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(task)]
    what = " ".join(dict.fromkeys(str(task[k]) for k in ("kind", "stack", "targets", "dtype") if task.get(k)))
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})},
                              timeout=task.get("timeout") or None)
    except subprocess.TimeoutExpired:
        print(f"  ! {what}: stopped after --worker-timeout {task['timeout']} s", file=sys.stderr, flush=True)
        return None
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        print(f"  ! {what} failed (exit {proc.returncode}):\n{tail}", file=sys.stderr, flush=True)
        return None
    print(f"  . {what}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    result = json.loads(lines[-1][len("RESULT "):])
    if task.get("log"):  # --json: every worker's result kept as it comes, for a run stopped from outside
        with open(task["log"], "a") as f:
            f.write(json.dumps({"task": task, "result": result}) + "\n")
    return result


# the memory worker's environment on a CPU: every allocation of 64 KiB or more mapped on its own (measure_memory)
CPU_MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def memory_cell(task: dict) -> dict | None:
    """measure_memory in a worker of its own, on a CPU with CPU_MEMORY_ENV."""
    return run_worker({**task, "kind": "memory"}, env=CPU_MEMORY_ENV if task["device"] == "cpu" else None)


def train_cell(task: dict) -> dict | None:
    """measure_train's results for one (stack, targets), its peak_bytes from measure_memory in a process of
    its own. On a CPU that process maps each large allocation on its own, so the peak does not depend on
    what glibc's heap happens to keep (the default heap's figure, from measure_train, stays as rss_peak_bytes)."""
    out = run_worker({**task, "kind": "train"})
    if out is None or task["device"] != "cpu":
        return out
    mem = memory_cell(task)
    # None when that worker failed: the report says so rather than set one method's peak against the other's
    out.update(rss_peak_bytes=out["peak_bytes"], peak_bytes=mem["peak_bytes"] if mem else None)
    return out


def worker_main(task: dict):
    torch.set_num_threads(task["threads"])
    if task.get("quiet_hf"):  # deprecation chatter of the reference stack
        import transformers
        transformers.logging.set_verbosity_error()
        warnings.filterwarnings("ignore", category=FutureWarning)
    print("RESULT " + json.dumps(WORKERS[task["kind"]](task)), flush=True)


# ----------------------------------------------------------------------------- report

def med(xs):
    return statistics.median(xs) if xs else float("nan")


def verdict(ratio: float, goal: float, higher_is_better: bool, fmt: str = "{:g}x") -> str:
    ok = ratio >= goal if higher_is_better else ratio <= goal
    return f"{'>=' if higher_is_better else '<='} {fmt.format(goal)} {'ok' if ok else 'MISSED'}"


def report(shape_name: str, dtype: str, device: str, cells: dict, gen: dict | None, peak: float, B: int, T: int):
    """The table of one shape and dtype; `cells` maps (stack, targets) to measure_train's results."""
    shape = SHAPES[shape_name]
    rows = []

    def row(name, ours, theirs, ratio, goal):
        rows.append((name, ours, theirs, ratio, goal))

    mib = 1 / 2**20

    def memory_row(name, o, t):  # t None: ours only; peak_bytes None: that memory worker failed
        a, b = o["peak_bytes"], None if t is None else t["peak_bytes"]
        shown = lambda x: "failed" if x is None else f"{x * mib:,.0f}"  # noqa: E731
        if a is None or b is None or not b:  # no ratio against a zero peak
            row(name, shown(a), "-" if t is None else shown(b), "", "")
        else:
            row(name, shown(a), shown(b), f"{a / b:.2f}x", verdict(a / b, GOALS["memory"], False))
    for tname in TARGETS:
        o, t, pair = cells.get(("ours", tname)), cells.get(("theirs", tname)), cells.get(("pair", tname))
        if o is None:
            row(f"LoRA step {tname}: tokens/s", "failed", "", "", "")
            continue
        tok_o = B * T / med(o["step_s"])  # alone in its process
        if t is not None:
            tok_t = B * T / med(t["step_s"])
            # the ratio from the interleaved run when there is one, the alone-in-process figures beside it
            tok_po, tok_pt = (B * T / med(pair["ours_s"]), B * T / med(pair["theirs_s"])) if pair else (tok_o, tok_t)
            row(f"LoRA step {tname}: tokens/s", f"{tok_po:,.0f}", f"{tok_pt:,.0f}", f"{tok_po / tok_pt:.2f}x",
                verdict(tok_po / tok_pt, GOALS["train"], True))
            if pair is not None:
                row("  each alone in its process", f"{tok_o:,.0f}", f"{tok_t:,.0f}", f"{tok_o / tok_t:.2f}x", "")
            memory_row(f"LoRA step {tname}: peak MiB", o, t)
            if o["n_trainable"] != t["n_trainable"]:
                row("  !! trainable parameters differ", f"{o['n_trainable']:,}", f"{t['n_trainable']:,}", "", "")
        else:
            row(f"LoRA step {tname}: tokens/s", f"{tok_o:,.0f}", "-", "", "")
            memory_row(f"LoRA step {tname}: peak MiB", o, None)
        step_flops = train_flops(shape.model, TARGETS[tname], 8, B, T, o.get("n_loss_tokens"))
        flops = step_flops / med(o["step_s"])
        row(f"LoRA step {tname}: GFLOP/s", f"{flops / 1e9:,.1f}", "", f"{flops / peak:.0%} of mm peak", "")
        c, cm = cells.get(("compiled", tname)), cells.get(("ours-compiled", tname))
        if c is not None:  # --compile: interleaved with our eager step and theirs
            tok_c, tok_e = B * T / med(c["compiled_s"]), B * T / med(c["eager_s"])
            if "theirs_s" in c:
                tok_t = B * T / med(c["theirs_s"])
                row("  with --compile: tokens/s", f"{tok_c:,.0f}", f"{tok_t:,.0f}", f"{tok_c / tok_t:.2f}x",
                    verdict(tok_c / tok_t, GOALS["train"], True))
            row("  with --compile: tokens/s vs our eager step", f"{tok_c:,.0f}", f"{tok_e:,.0f} (eager)", f"{tok_c / tok_e:.2f}x", "")
            row("  with --compile: first step (compiling): s", f"{c['compile_s'][0]:,.1f}", "", "", "")
            flops = step_flops / med(c["compiled_s"])
            row("  with --compile: GFLOP/s", f"{flops / 1e9:,.1f}", "", f"{flops / peak:.0%} of mm peak", "")
        if cm is not None:
            memory_row("  with --compile: peak MiB", cm, t)
            if cm.get("graphs_in_peak"):  # the measured model did not reuse the throwaway's graphs
                print(f"  note: {cm['graphs_in_peak']} graph(s) compiled inside the {tname} peak: the compiler's "
                      "memory is in it")

    c, t = cells.get(("ours-ckpt", "all-linear")), cells.get(("theirs", "all-linear"))
    if c is not None and t is not None:  # ours with --grad-checkpoint against theirs without, each alone
        tok_c, tok_t = B * T / med(c["step_s"]), B * T / med(t["step_s"])
        row("  with --grad-checkpoint: tokens/s", f"{tok_c:,.0f}", f"{tok_t:,.0f}", f"{tok_c / tok_t:.2f}x", "")
        memory_row("  with --grad-checkpoint: peak MiB", c, t)
    for tname in TARGETS:  # q,k,v,o: the default targets (LoRAConfig, train.py); all-linear: E_rm's largest share
        o = cells.get(("ours", tname))
        if o is not None and "ag_step_s" in o:
            plain, ag = med(o["ag_plain_step_s"]), med(o["ag_step_s"])
            row(f"AlignGuard step vs plain, {tname}: ms", f"{ag * 1e3:,.0f}", f"{plain * 1e3:,.0f} (plain)",
                f"{ag / plain - 1:+.1%}", verdict(ag / plain - 1, GOALS["alignguard"], False, "{:.0%}"))
    o = cells.get(("ours", "all-linear"))
    if o is not None and "kfac_s" in o:
        plain, kfac = med(o["ag_plain_step_s"]), med(o["kfac_s"])
        if "fisher_s" in o:
            fisher = med(o["fisher_s"])
            row("estimate_fisher(1 batch) vs step: s", f"{fisher:,.2f}", f"{plain:,.2f} (step)", f"{fisher / plain:.2f}x",
                verdict(fisher / plain, GOALS["fisher"], False))
            row("  of which eigh (once per run)", f"{max(fisher - kfac, 0):,.2f}", "", f"{max(fisher - kfac, 0) / plain:.2f}x", "")
        row("K-FAC factors (1 batch) vs step: s", f"{kfac:,.2f}", f"{plain:,.2f} (step)", f"{kfac / plain:.2f}x",
            verdict(kfac / plain, GOALS["fisher"], False))
    if gen is not None:
        tok_o, tok_t = gen["new_tokens"] / med(gen["ours_s"]), gen["new_tokens"] / med(gen["theirs_s"])
        row("greedy generation: tokens/s", f"{tok_o:,.0f}", f"{tok_t:,.0f}", f"{tok_o / tok_t:.2f}x",
            verdict(tok_o / tok_t, GOALS["generate"], True))
        same = "yes" if gen["tokens_equal"] else f"NO ({gen['n_equal']}/{gen['new_tokens']} equal)"
        row("  same tokens / max logit diff", same, f"{gen['logit_max_diff']:.1e}", "", "")
        row("  entering model.decode_layout (once): s", f"{gen['layout_s']:.2f}", "", "", "")

    spreads = {f"{s}/{t} {k}": max(v[k]) / min(v[k]) for (s, t), v in cells.items() if v
               for k in ("step_s", "ours_s", "theirs_s", "ag_plain_step_s", "ag_step_s", "kfac_s", "eager_s", "compiled_s")
               if k in v}
    worst = max(spreads, key=spreads.get, default=None)

    head = ("measurement", "ours", "theirs", "ours/theirs", "goal")
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(5)]
    print("  " + "  ".join(h.ljust(w) for h, w in zip(head, widths)))
    for r in rows:
        print("  " + "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    if worst is not None and spreads[worst] > 1.25:
        print(f"  note: repetitions of {worst} spread {spreads[worst]:.2f}x (slowest / fastest): the machine is "
              f"busy, these ratios are unreliable")


# ----------------------------------------------------------------------------- main

def scaling(args, base: dict):
    """README's scaling tables, our stack only (all-linear LoRA, fp32, the small shape): step time and
    peak memory against sequence length T and rank r; the AlignGuard step's overhead against width C and
    against the micro-batches of one optimizer step (the penalty is a cost per optimizer step, not per token)."""
    print("\n## step time and peak memory of our LoRA step (all-linear, fp32, small shape, B=4)")
    print("| T | r | step ms | tokens/s | peak MiB |\n|---|---|---|---|---|")
    for T in (128, 256, 512):
        for r in (8, 32):
            c = train_cell({**base, "stack": "ours", "targets": "all-linear", "seq": T, "rank": r, "no_eigh": True})
            if c:
                t = med(c["step_s"])
                peak = "failed" if c["peak_bytes"] is None else f"{c['peak_bytes'] / 2**20:.0f}"
                print(f"| {T} | {r} | {1e3 * t:.0f} | {base['batch'] * T / t:,.0f} | {peak} |")
    print("\n## AlignGuard step over the plain step against width C (all-linear, r=8, k=32, 8 layers, B=4, T=256)")
    print("| C | parameters | plain ms | AlignGuard ms | overhead |\n|---|---|---|---|---|")
    for C in (128, 256, 512, 1024):
        task = {**base, "kind": "train", "stack": "ours", "targets": "all-linear", "hidden": C, "no_eigh": True}
        with torch.device("meta"):
            n = sum(p.numel() for p in Llama(task_shape(task).model).parameters())
        c = run_worker(task)
        if c:
            plain, ag = med(c["ag_plain_step_s"]), med(c["ag_step_s"])
            print(f"| {C} | {n / 1e6:.1f}M | {1e3 * plain:.0f} | {1e3 * ag:.0f} | {100 * (ag / plain - 1):+.1f}% |")
    print("\n## AlignGuard step over the plain step against tokens per optimizer step (small shape, all-linear, r=8, k=32):"
          "\n## the penalty is computed once per optimizer step, however many micro-batches (--grad-accum) it sums")
    print("| micro-batches of 4 x 256 | tokens per step | plain ms | AlignGuard ms | overhead |\n|---|---|---|---|---|")
    for k in (1, 2, 4):
        c = run_worker({**base, "kind": "train", "stack": "ours", "targets": "all-linear", "accum": k, "no_eigh": True})
        if c:
            plain, ag = med(c["ag_plain_step_s"]), med(c["ag_step_s"])
            print(f"| {k} | {k * base['batch'] * base['seq']:,} | {1e3 * plain:.0f} | {1e3 * ag:.0f} | {100 * (ag / plain - 1):+.1f}% |")


def selected_shapes(name: str, device: str) -> list[str]:
    """The shapes --shape names: `all` is every measuring shape the device runs (not the tiny check shape)."""
    if name != "all":
        if device == "cpu" and SHAPES[name].cuda_only:
            raise SystemExit(f"--shape {name} is for --device cuda only")
        return [name]
    return [s for s, v in SHAPES.items() if not v.check_only and (device == "cuda" or not v.cuda_only)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="small", choices=[*SHAPES, "all"], help="model shape (all: every measuring shape the device runs, not tiny)")
    p.add_argument("--dtype", default="all", choices=[*DTYPES, "all"], help="compute dtype")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--reps", type=int, default=5, help="timed repetitions per measurement (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--quick", action="store_true", help="fewer repetitions and generated tokens, for checking the script")
    p.add_argument("--batch", type=int, default=0, help="rows per step (0: the shape's default)")
    p.add_argument("--seq", type=int, default=0, help="tokens per row (0: the shape's default)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch.set_num_threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-eigh", action="store_true", help="time only the per-batch K-FAC factors, not estimate_fisher's "
                   "one-off eigendecompositions (minutes at d = 8192)")
    p.add_argument("--compile", action="store_true", help="also time our step with compiled blocks (train.py --compile) "
                   "against our eager step and theirs, and its peak memory (a minute or more of compiling per process)")
    p.add_argument("--profile", action="store_true", help="also print torch.profiler's table of our all-linear LoRA step")
    p.add_argument("--json", default="", help="write every raw timing and memory figure to this file (rewritten "
                   "after each shape and dtype; each worker's result is appended to FILE.workers.jsonl as it comes)")
    p.add_argument("--worker-timeout", type=float, default=0, help="seconds a measurement's process may run before "
                   "it is stopped and reported as such (0: no limit)")
    p.add_argument("--scaling", action="store_true", help="our step against T and r, AlignGuard overhead against "
                   "width and micro-batches per step (the README's scaling tables), instead of the comparison")
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)  # internal: one measurement, JSON task
    args = p.parse_args(argv)
    if args.worker:
        return worker_main(json.loads(args.worker))
    if hasattr(sys.stdout, "reconfigure"):  # each table line out at once, even into a pipe or a file
        sys.stdout.reconfigure(line_buffering=True)

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    shapes = selected_shapes(args.shape, args.device)
    dtypes = list(DTYPES) if args.dtype == "all" else [args.dtype]
    reps, warmup = (3, 1) if args.quick else (args.reps, args.warmup)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    print(env_header(args.device, torch.get_num_threads()))
    load = os.getloadavg()[0]
    if args.device == "cpu" and load > 0.5:
        print(f"# WARNING: load average {load:.1f} before start: other processes compete for the {os.cpu_count()} CPUs "
              f"(threads without a core of their own stall each other's parallel loops); timings are unreliable")
    missing = have_reference()
    if missing:
        print(f"# transformers/peft not available ({missing}): measuring our stack only")

    if args.scaling:
        return scaling(args, {"shape": "small", "dtype": "fp32", "device": args.device, "threads": args.threads,
                              "seed": args.seed, "batch": SHAPES["small"].batch, "seq": SHAPES["small"].seq,
                              "reps": reps, "warmup": warmup})
    peaks = {d: matmul_peak(DTYPES[d], args.device, reps=max(reps, 5)) for d in dtypes}
    print("# matmul peak (torch.mm, square): " + ", ".join(f"{d} {f / 1e9:,.0f} GFLOP/s" for d, f in peaks.items()))
    if args.device == "cpu" and "bf16" in dtypes and native_bf16() is False:
        # without avx512_bf16 or AMX, bf16 matmuls are emulated: 57 against 225 GFLOP/s fp32 on one host the
        # development machine ran on (2026-12-03), where bf16 steps had run faster than fp32 ones on earlier hosts
        print("# note: this CPU has no native bf16 (avx512_bf16 / amx_bf16 not in /proc/cpuinfo): the bf16 sections "
              "measure its emulation, not comparable with a CPU that has it")
    results = {"env": env_header(args.device, torch.get_num_threads()), "peaks": peaks, "runs": []}
    worker_log = args.json and args.json + ".workers.jsonl"
    if worker_log:
        Path(worker_log).write_text("")  # this run's workers only
    for shape_name in shapes:
        shape = SHAPES[shape_name]
        B, T = args.batch or shape.batch, args.seq or shape.seq
        with torch.device("meta"):
            n_params = sum(p.numel() for p in Llama(shape.model).parameters())
        for dtype in dtypes:
            print(f"\n## {shape_name} ({n_params / 1e6:,.1f}M params), {dtype}, {args.device}, B={B} T={T}, "
                  f"LoRA r=8 alpha=16, median of {reps} after {warmup} warm-up")
            if shape.check_only:
                print("# the tiny check shape: these figures only show that every measurement runs")
            base = {"shape": shape_name, "dtype": dtype, "device": args.device, "threads": args.threads,
                    "seed": args.seed, "batch": B, "seq": T, "reps": reps, "warmup": warmup,
                    "quiet_hf": missing is None, "no_eigh": args.no_eigh, "timeout": args.worker_timeout,
                    "log": worker_log,
                    # --quick: half the new tokens, at least 8, never more than the shape's own
                    "gen_new": min(shape.gen_new, max(8, shape.gen_new // 2)) if args.quick else shape.gen_new}
            cells = {}
            for tname in TARGETS:
                for stack in ("ours", "theirs") if missing is None else ("ours",):
                    cells[(stack, tname)] = train_cell({**base, "stack": stack, "targets": tname})
                if missing is None:  # the tokens/s ratio: both stacks interleaved in one process
                    cells[("pair", tname)] = run_worker({**base, "kind": "pair", "stack": "pair", "targets": tname})
            if args.compile:  # ours with compiled blocks (train.py --compile), interleaved with ours eager and theirs
                for tname in TARGETS:
                    cells[("compiled", tname)] = run_worker({**base, "kind": "compiled", "stack": "compiled",
                                                             "targets": tname, "with_theirs": missing is None})
                    cells[("ours-compiled", tname)] = memory_cell({**base, "stack": "ours", "targets": tname, "compile": True})
            # ours with activation checkpointing (train.py --grad-checkpoint), against theirs without
            cells[("ours-ckpt", "all-linear")] = train_cell({**base, "stack": "ours", "targets": "all-linear",
                                                             "grad_checkpoint": True})
            gen = run_worker({**base, "kind": "generate"}) if missing is None else None
            report(shape_name, dtype, args.device, cells, gen, peaks[dtype], B, T)
            results["runs"].append({**base, "cells": {f"{s}/{t}": v for (s, t), v in cells.items()}, "generate": gen})
            if args.json:
                Path(args.json).write_text(json.dumps(results, indent=1))
            if args.profile:
                prof = run_worker({**base, "kind": "profile", "targets": "all-linear", "reps": min(reps, 3)})
                if prof is not None:
                    print(prof["table"])
    if args.json:
        print(f"\n# raw results -> {args.json}")


if __name__ == "__main__":
    main()

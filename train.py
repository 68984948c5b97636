"""Fine-tune a Llama-style chat model with AlignGuard-LoRA (or a baseline) and write a PEFT adapter.

    python train.py                      # the demo: plain LoRA vs AlignGuard-LoRA on data/demo, one table
    python train.py --ckpt DIR --task data/sst2.jsonl --align data/align.jsonl --out runs/sst2
    python train.py --ckpt DIR --task data/sst2.jsonl --method lora --out runs/sst2-lora
    torchrun --nproc_per_node 2 train.py --ckpt DIR --task data/sst2.jsonl --out runs/ddp

One function, `train`, holds the whole loop in nanoGPT's order: setup, data, model, Fisher,
optimizer, then per step: learning rate, evaluation/checkpoint, micro-steps, unscale, clip, step,
log. Outputs in --out: adapter/ (PEFT format), fisher-*.safetensors, metrics.jsonl, summary.json,
checkpoint/ (resumable), merged/ with --merge.
"""

import argparse
import hashlib
import json
import math
import os
import pickle
import re
import shutil
import sys
import textwrap
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from alignguard import (AlignGuardConfig, LoRAConfig, add_lora, diag_fisher, disable_lora, estimate_fisher,
                        ewc_penalty, l2_penalty, load_adapter, load_diag_fisher, load_fisher, lora_parameters,
                        merged_state_dict, penalties, read_json_object, read_safetensors, release_rm_buffers, remove_lora,
                        save_adapter, save_diag_fisher, save_fisher)
from data import check_input, collate, driftcheck_prompts, encode_pairs, load_tokenizer, read_align, read_task
from eval import EvalConfig, balanced_subset, compare, evaluate_model, field_help, format_report, load_eval_data
from model import (TOKENIZER_FILES, Llama, ModelConfig, check_cuda, check_device, checkpoint_digest, file_digest,
                   init_weights, load_model, logits_at, normal_file_mode, present, resolve_checkpoint, save_model)

METHODS = ("alignguard", "lora", "l2", "ewc", "full")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainConfig:
    ckpt: str = "data/demo"        # checkpoint: .safetensors file, directory or sharded index.json
    task: str = "data/sst2.jsonl"  # task jsonl: {"prompt","response"}, SST-2 {"sentence","label"} or {"text"}
    align: str = "data/align.jsonl"  # alignment jsonl {"prompt","response"} for the Fisher (alignguard, ewc)
    eval_task: str = ""            # held-out task jsonl for the eval loss; "" holds out --eval-size rows of --task
    out: str = "runs/train"        # output directory; an existing one is refused unless --resume
    method: str = "alignguard"     # alignguard | lora | l2 | ewc | full
    init: str = ""                 # --method full: config.json to start from random weights instead of --ckpt
    chat_format: str = "auto"      # auto | llama3 | chatml | llama2 | plain
    dtype: str = "fp32"            # autocast compute dtype: fp32 | bf16 | fp16 (fp16: dynamic loss scaling)
    loss_scale: float = 65536.0    # --dtype fp16: initial dynamic loss scale
    device: str = "auto"           # auto | cpu | cuda | cuda:N
    batch_size: int = 8            # examples per micro-batch per process
    grad_accum: int = 1            # micro-batches per optimizer step
    max_len: int = 256             # tokens per example; longer ones are truncated and counted
    grad_checkpoint: bool = False  # activation checkpointing: recompute each block in backward (less memory, more compute)
    compile: bool = False          # torch.compile the training forward's blocks: 16-62 s of compiling, then faster steps (README)
    steps: int = 0                 # optimizer steps; 0 derives them from --epochs
    epochs: float = 1.0            # passes over the task data when --steps is 0
    lr: float = 2e-4               # peak learning rate
    min_lr: float = 2e-5           # floor of the cosine decay
    warmup: int = 10               # linear warmup steps
    weight_decay: float = 0.0      # AdamW weight decay
    grad_clip: float = 1.0         # max global gradient norm after unscaling; 0 disables
    eval_every: int = 50           # steps between held-out evaluations; 0: only at the end
    eval_size: int = 64            # rows held out of --task when --eval-task is empty
    ckpt_every: int = 100          # steps between checkpoints; 0: only at the end
    log_every: int = 10            # steps between metrics.jsonl lines and progress updates
    n_align: int = 256             # alignment rows used to estimate the Fisher
    fisher_batch: int = 8          # alignment rows per Fisher batch
    fisher_cache: str = ""         # directory caching Fisher bases across runs (keyed by checkpoint, data, settings); "": --out
    lambda_l2: float = 1e-2        # --method l2: weight of sum ||ΔW||_F^2
    lambda_ewc: float = 1e2        # --method ewc: weight of 1/2 sum F_diag * ΔW^2
    resume: bool = False           # continue the run in --out from its checkpoint
    stop_after: int = 0            # checkpoint and stop after this many steps of this invocation (time-boxed jobs); 0: run to the end
    merge: bool = False            # also write merged/, a full checkpoint loadable by transformers
    seed: int = 0                  # seeds data order, initialisation, dropout and Fisher sampling

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"--method must be one of {METHODS}, got {self.method!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")
        if self.init and self.method != "full":
            raise ValueError("--init (random initialisation) needs --method full")
        for name in ("batch_size", "grad_accum", "max_len", "log_every", "n_align", "fisher_batch") + \
                (() if self.eval_task else ("eval_size",)):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("steps", "eval_every", "ckpt_every", "stop_after", "warmup"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be 0 or more, got {getattr(self, name)}")
        for name in ("epochs", "lr", "loss_scale"):  # isfinite refuses inf and NaN (which passes no comparison)
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise ValueError(f"--{name.replace('_', '-')} must be a finite number more than 0, "
                                 f"got {getattr(self, name)}")
        for name in ("min_lr", "weight_decay", "grad_clip", "lambda_l2", "lambda_ewc"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {getattr(self, name)}")
        check_device(self.device)
        if self.merge and self.method == "full":
            raise ValueError("--merge merges a LoRA adapter; --method full writes the whole model to model/ already")


# ----------------------------------------------------------------------------- pure helpers

def get_lr(step: int, total: int, lr: float, min_lr: float, warmup: int) -> float:
    """Linear warmup from lr/warmup to lr over `warmup` steps, then cosine decay to min_lr at `total`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if step >= total:
        return min_lr
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of token cross-entropies (fp32) over positions whose label is not -100."""
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")


class LMHeadLoss(torch.autograd.Function):
    """Σ_n CE(W h_n, y_n) for h (N, C), W (V, C), labels y (N,): token_loss_sum(F.linear(h, W), y) that never
    holds the (N, V) logits. The loss is a sum of per-row terms, so its gradient is known in the forward:
    ∂/∂h_n = (softmax(z_n) − onehot(y_n)) W and ∂/∂W = Σ_n (softmax(z_n) − onehot(y_n)) h_nᵀ. Rows go through
    in chunks of `rows`: logits, loss and gradient per chunk, then the chunk's logits are freed; backward only
    scales the stored gradients by the incoming one. Autograd through F.cross_entropy would keep the (N, V)
    log-probabilities for backward and build an (N, V) gradient there: 2 x 127 MB on SmolLM2 at N = 649.
    The same matmuls run as with autograd (forward logits, then the gradient ones), in the same dtypes.
    Each chunk reads all of W twice, so chunks hold hundreds of rows: at SmolLM2's shape (N = 649) chunks of
    2^20 logits (31 chunks) took 2.0x the time of lm_head_loss_sum's default 2^24 (2 chunks)."""

    @staticmethod
    def forward(ctx, h, W, y, rows):
        f32 = torch.promote_types(W.dtype, torch.float32)  # the loss and the sums: fp32, or fp64 for fp64
        loss = torch.zeros((), device=h.device, dtype=f32)
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        grad_W = torch.zeros(W.shape, device=W.device, dtype=f32) if ctx.needs_input_grad[1] else None
        for i in range(0, h.shape[0], rows):
            h_i, y_i = h[i:i + rows], y[i:i + rows]                      # (n, C), (n,)
            z = F.linear(h_i, W)                                         # (n, V) logits, autocast's dtype
            z_dtype, logp = z.dtype, torch.log_softmax(z.to(f32), -1)
            del z
            loss -= logp.gather(1, y_i[:, None]).sum()
            dz = logp.exp_()                                             # softmax(z), in place
            dz[torch.arange(len(y_i), device=dz.device), y_i] -= 1       # − onehot(y)
            dz = dz.to(z_dtype)                                          # autograd's cast back to the logits' dtype
            if grad_h is not None:
                grad_h[i:i + rows] = dz @ W
            if grad_W is not None:
                grad_W += dz.mT @ h_i
        ctx.save_for_backward(grad_h, grad_W)
        ctx.W_dtype = W.dtype
        return loss

    @staticmethod
    def backward(ctx, g):
        grad_h, grad_W = ctx.saved_tensors
        return (None if grad_h is None else grad_h * g.to(grad_h.dtype),
                None if grad_W is None else (grad_W * g).to(ctx.W_dtype),
                None, None)


def lm_head_loss_sum(lm_head: nn.Module, h: torch.Tensor, labels: torch.Tensor, chunk: int = 2**24) -> torch.Tensor:
    """token_loss_sum(lm_head(h), labels) for h (N, C) and labels (N,) with no -100: through LMHeadLoss,
    `chunk` logits at a time, when lm_head is a plain bias-free Linear and a gradient is wanted; otherwise
    (no grad, an adapted lm_head, or fp16, whose loss scale must multiply the softmax before its cast to
    fp16 and is not known in the forward) through the logits."""
    W, dev = getattr(lm_head, "weight", None), h.device.type
    fp16 = (torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype) == torch.float16
    if (type(lm_head) is nn.Linear and lm_head.bias is None and not fp16 and torch.is_grad_enabled()
            and (h.requires_grad or W.requires_grad)):
        return LMHeadLoss.apply(h, W, labels, max(1, chunk // W.shape[0]))
    return token_loss_sum(lm_head(h)[None], labels[None])


def batch_loss_sum(model, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """token_loss_sum of the model on a batch, with lm_head applied only at labelled positions:
    (N, V) logits instead of (B, T, V), which with a large vocabulary and short responses is most of
    the step's time and memory, and a chunk of them at a time (lm_head_loss_sum)."""
    keep = labels != -100                                   # (B, T)
    h = model(input_ids, hidden_only=True)[keep]            # (N, C)
    return lm_head_loss_sum(model.lm_head, h, labels[keep])


def labelled_logits(model, batch: dict) -> torch.Tensor:
    """(N, V) logits at the labelled positions of a batch, the forward the Fisher estimation uses
    (alignguard's `forward` hook): lm_head skips the prompt, as in training."""
    return logits_at(model, batch["input_ids"], batch["labels"] != -100)  # (N, V)


def normalised_loss(loss_sum: torch.Tensor, n_tokens_step: int) -> torch.Tensor:
    """A micro-batch's contribution to the step loss: its token-loss sum over the response tokens of
    the WHOLE accumulated (and, under torchrun, global) batch. Summing the contributions of k
    micro-batches gives the mean over all their tokens, whatever each micro-batch holds; a mean of
    per-micro-batch means would over-weight short micro-batches."""
    return loss_sum / max(1, n_tokens_step)


def example_order(n: int, seed: int, start: int, count: int) -> list[int]:
    """Indices start..start+count of the endless sequence of per-epoch permutations of range(n),
    epoch e shuffled with seed (seed, e). Depends only on its arguments, so a resumed run reads
    exactly the rows the uninterrupted one would have read."""
    out = []
    while len(out) < count:
        epoch, offset = divmod(start + len(out), n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
        out += perm[offset:offset + count - len(out)]
    return out


def is_fisher_cache(name: str) -> bool:
    """Whether a file name is a Fisher cache's, fisher-<method>-<16 hex digits of its key>.safetensors (train)."""
    return re.fullmatch(r"fisher-(alignguard|ewc)-[0-9a-f]{16}\.safetensors", name) is not None


def atomic_dir(final: Path, write):
    """Fill a temporary sibling directory with `write(tmp)`, then swap it in for `final`. The old
    directory is removed only after the new one is complete, so a failure (a full disk, a kill)
    leaves the previous good copy in place: at `final`, or at `final.old` if it stopped mid-swap."""
    tmp, old = final.with_name(final.name + ".tmp"), final.with_name(final.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------- loss scaling

@dataclass
class LossScaler:
    """Dynamic loss scaling for fp16: multiply the loss by `scale` so small gradients survive fp16,
    divide the gradients back before anything reads them; on inf/nan skip the step and halve the
    scale, after `interval` good steps in a row double it."""
    scale: float = 2.0 ** 16       # current multiplier
    interval: int = 2000           # good steps before the scale doubles
    good_steps: int = 0            # good steps since the last change
    enabled: bool = True           # False: scale stays 1 and nothing is ever skipped

    def update(self, finite: bool) -> bool:
        """Record a step's outcome; returns whether the optimizer may step."""
        if not self.enabled:
            return finite
        if not finite:
            self.scale, self.good_steps = self.scale / 2, 0
            return False
        self.good_steps += 1
        if self.good_steps >= self.interval:
            self.scale, self.good_steps = self.scale * 2, 0
        return True


# ----------------------------------------------------------------------------- checkpoints

# options --resume may change: they decide when to log, evaluate, checkpoint and stop, or where and how the same
# steps are computed (--grad-checkpoint, --compile, --compile-rm, --rm-chunk), not what is trained (with
# --lora-dropout above 0, compiled blocks draw other dropout masks than eager ones); any other
# difference from the checkpoint's run is refused. The data files and the model (checkpoint, config and tokenizer)
# are compared by content (the run's "data" digests), not by how their paths
# are spelled; the number of processes, which sets the rows of a step, must be the same too.
RESUMABLE = {"resume", "out", "stop_after", "log_every", "eval_every", "ckpt_every", "device", "fisher_cache", "merge",
             "grad_checkpoint", "compile", "compile_rm", "rm_chunk", "task", "eval_task", "align", "ckpt", "init"}
# what the run records of earlier versions did not hold: compared only when the checkpoint's record has it (a
# record without the model's digest has its resolved --ckpt / --init path compared instead)
_RECORDED_SINCE = {("data", "model"), ("processes", "world")}


def check_resume(ck: Path, saved: dict | None, run: dict):
    """Refuses to continue a run with other options or data than it was started with, naming what differs:
    every field of either record, so a data file given then and not now (or now and not then) is one too."""
    if saved is None:  # a checkpoint from before runs were recorded
        return
    diff, by_path = [], "model" not in saved.get("data", {})
    model_flag = "init" if run.get("train", {}).get("init") else "ckpt"
    for part in sorted(run.keys() | saved.keys()):
        now, was = run.get(part, {}), saved.get(part, {})
        for k in sorted(now.keys() | was.keys()):
            a, b = was.get(k), now.get(k)
            resumable = k in RESUMABLE and not (by_path and part == "train" and k == model_flag)
            if a == b or (part != "data" and resumable) or ((part, k) in _RECORDED_SINCE and k not in was):
                continue
            flag = "--" + ("lora-" if part == "lora" else "") + (model_flag if (part, k) == ("data", "model") else k).replace("_", "-")
            if part == "processes":
                diff.append(f"the number of processes: {a} -> {b}")
            elif part == "data":
                diff.append(f"the content of {flag}" if a and b else f"{flag} {'not given now' if a else 'not given then'}")
            else:
                diff.append(f"{flag}: {a!r} -> {b!r}")
    if diff:
        raise ValueError(f"{ck}: --resume with other options or data than the run it holds ({'; '.join(diff)}); "
                         "resume with the same ones, or start a new run in another --out")


def save_checkpoint(out: Path, step: int, model, optimizer, scaler: LossScaler, extra: dict):
    """Trainable tensors (safetensors), optimizer + RNG state (torch), step/scaler/metrics and the run (JSON)."""
    trainable = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    rng = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}

    def write(tmp: Path):
        save_file(trainable, str(tmp / "trainable.safetensors"))
        normal_file_mode(tmp / "trainable.safetensors")  # save_file makes it private (0600)
        torch.save({"optimizer": optimizer.state_dict(), "rng": rng}, tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, "scaler": asdict(scaler), **extra}, indent=2))

    atomic_dir(out / "checkpoint", write)


def checkpoint_dir(out: Path) -> Path:
    """out/checkpoint, or checkpoint.old when the run stopped in the middle of a checkpoint swap."""
    ck = out / "checkpoint"
    if not (ck / "state.json").exists() and (out / "checkpoint.old" / "state.json").exists():
        ck = out / "checkpoint.old"
    if not (ck / "state.json").exists():
        raise ValueError(f"{out}: --resume given but there is no checkpoint/ to resume from")
    return ck


def load_checkpoint(out: Path, model, optimizer, scaler: LossScaler) -> dict:
    ck = checkpoint_dir(out)
    state = read_json_object(ck / "state.json")
    tensors, _ = read_safetensors(ck / "trainable.safetensors")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(tensors) != set(params):
        raise ValueError(f"{ck}/trainable.safetensors: its tensors do not match this run's trainable parameters "
                         f"(missing {sorted(set(params) - set(tensors))[:5]}, unexpected {sorted(set(tensors) - set(params))[:5]})")
    wrong = [n for n, p in params.items() if tensors[n].shape != p.shape]
    if wrong:
        raise ValueError(f"{ck}/trainable.safetensors: {wrong[0]} has shape {list(tensors[wrong[0]].shape)}, this run's "
                         f"{list(params[wrong[0]].shape)}")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(tensors[n])
    try:
        # tensors and plain values only, so loading runs no code from the file; to each param's device below
        blob = torch.load(ck / "optimizer.pt", map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
        raise ValueError(f"{ck / 'optimizer.pt'}: not a readable optimizer state ({e})") from None
    optimizer.load_state_dict(blob["optimizer"])
    torch.set_rng_state(blob["rng"]["torch"])
    if blob["rng"]["cuda"]:
        torch.cuda.set_rng_state_all(blob["rng"]["cuda"])
    if scaler.enabled:  # this run's --dtype decides whether there is a scaler at all
        scaler.scale, scaler.good_steps = state["scaler"]["scale"], state["scaler"]["good_steps"]
    return state


# ----------------------------------------------------------------------------- the loop

def train(cfg: TrainConfig, lora: LoRAConfig, agc: AlignGuardConfig) -> dict:
    # --- setup: processes, device, precision
    ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
    device = cfg.device if cfg.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":  # torchrun's local rank picks the GPU of this process
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    if ddp:
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    master = rank == 0
    if device.startswith("cuda"):
        check_cuda(device)
        torch.cuda.set_device(device)
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    dtype = DTYPES[cfg.dtype]
    autocast = torch.autocast(device_type=device_type, dtype=dtype, enabled=dtype != torch.float32)
    scaler = LossScaler(scale=cfg.loss_scale, enabled=dtype == torch.float16)
    torch.manual_seed(cfg.seed)  # the same initialisation (LoRA A, --init) on every process

    out = Path(cfg.out)
    for flag, path in (("--out", out), ("--fisher-cache", Path(cfg.fisher_cache) if cfg.fisher_cache else None)):
        if path is not None and path.exists() and not path.is_dir():
            raise ValueError(f"{flag} {path}: is a file, not a directory")
    # Fisher caches alone (a run that stopped before its first checkpoint) do not make --out a run: they are
    # keyed by everything they depend on, so a new run reuses the one it matches and writes no other's name
    held = []  # what in --out a new run would mix with
    if master and not cfg.resume and out.is_dir():
        held = [p.name for p in out.iterdir() if not is_fisher_cache(p.name)]
    if held:
        raise ValueError(f"{out}: output directory exists and holds {', '.join(sorted(held)[:4])}"
                         f"{' ...' if len(held) > 4 else ''}; choose another --out, "
                         f"or pass --resume to continue the run it holds")

    # --- data: tokenised once, a fixed ordered held-out set for the eval loss
    for flag, path in (("--task", cfg.task), ("--eval-task", cfg.eval_task), ("--init", cfg.init)):
        check_input(flag, path)
    tok = load_tokenizer(cfg.ckpt if not cfg.init else Path(cfg.init).parent, cfg.chat_format)

    def encode(pairs, name):  # (input_ids, labels) rows; truncation is reported on stderr
        return [ex[:2] for ex in encode_pairs(tok, pairs, cfg.max_len, name=name)]

    task = encode(read_task(cfg.task), cfg.task)
    if cfg.eval_task:
        heldout = encode(read_task(cfg.eval_task), cfg.eval_task)
    else:
        if len(task) <= cfg.eval_size:
            raise ValueError(f"{cfg.task}: {len(task)} rows, too few to hold out --eval-size {cfg.eval_size}")
        order = torch.randperm(len(task), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
        heldout = [task[i] for i in order[:cfg.eval_size]]
        task = [task[i] for i in order[cfg.eval_size:]]
    # what this run is: a resume must continue the same one (check_resume); the model and data files by content
    model_dir = Path(cfg.init).parent if cfg.init else resolve_checkpoint(cfg.ckpt)[0]  # config.json, tokenizer.json
    base_digest = file_digest([cfg.init, *present(model_dir, TOKENIZER_FILES)]) if cfg.init else checkpoint_digest(cfg.ckpt)
    paths = {k: str(Path(getattr(cfg, k)).resolve()) for k in ("ckpt", "init") if getattr(cfg, k)}  # however spelled
    run = {"train": {**asdict(cfg), **paths},
           "lora": {**asdict(lora), "targets": sorted(lora.targets)},  # a set: their order changes nothing
           "alignguard": asdict(agc),
           "processes": {"world": world},
           "data": {"model": base_digest,
                    **{role: file_digest([f]) for role, f in (("task", cfg.task), ("eval_task", cfg.eval_task))
                       if f}}}
    if cfg.method in ("alignguard", "ewc"):
        if not Path(cfg.align).is_file():  # named here, before a resume would call it "not given now"
            raise FileNotFoundError(f"--align {cfg.align}: no such file (the alignment set for the Fisher)")
        run["data"]["align"] = file_digest([cfg.align])
    if cfg.resume:  # before the model is loaded or anything is written
        ck = checkpoint_dir(out)
        check_resume(ck, read_json_object(ck / "state.json").get("run"), json.loads(json.dumps(run)))
    per_step = cfg.batch_size * cfg.grad_accum * world  # examples per optimizer step, all processes
    total_steps = cfg.steps or max(1, math.ceil(cfg.epochs * len(task) / per_step))
    steps_text = f"{total_steps} step{'s' if total_steps != 1 else ''}"
    if master and cfg.warmup > total_steps:
        print(f"note: --warmup {cfg.warmup} is longer than the run's {steps_text}: the learning rate never reaches "
              f"--lr {cfg.lr:g}", file=sys.stderr)
    if master and cfg.min_lr > cfg.lr:
        print(f"note: --min-lr {cfg.min_lr:g} is above --lr {cfg.lr:g}, so after the warmup the learning rate "
              f"rises to --min-lr instead of decaying; pass a lower --min-lr for a decay", file=sys.stderr)
    if master and dtype == torch.float16 and device_type == "cpu":
        print("note: --dtype fp16 on a CPU runs without fast kernels (a Fisher took 20x its fp32 time here); "
              "bf16 or fp32 are faster", file=sys.stderr)

    # --- model: frozen base weights in the compute dtype, trainable weights in fp32
    base_dtype = dtype if cfg.method != "full" and not cfg.init else torch.float32
    if cfg.init:
        model = init_weights(Llama(ModelConfig.from_hf(cfg.init)), seed=cfg.seed).to(device)
    else:
        model = load_model(cfg.ckpt, device=device, dtype=base_dtype)
    if master:  # only once the data, tokenizer and checkpoint have been read: bad input leaves nothing behind
        out.mkdir(parents=True, exist_ok=True)

    # --- the aligned model's Fisher (before any adapter exists), cached in --out
    basis = f_diag = None
    if cfg.method in ("alignguard", "ewc"):
        align = encode(read_align(cfg.align)[:cfg.n_align], cfg.align)
        batches = [collate(align[i:i + cfg.fisher_batch], tok.pad_id) for i in range(rank * cfg.fisher_batch, len(align), world * cfg.fisher_batch)]
        batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
        # the base and the alignment set, each read once: the digests of the run record
        data_hash = hashlib.sha256(f"{base_digest} {run['data']['align']}".encode()).hexdigest()[:16]
        meta = {"data_hash": data_hash, "k": agc.k, "kind": agc.fisher,
                "targets": list(lora.targets), "n_align": len(align), "max_len": cfg.max_len, "seed": cfg.seed,
                "world": world, "fisher_batch": cfg.fisher_batch, "dtype": cfg.dtype, "chat_format": tok.chat_format}
        key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]
        cache_dir = Path(cfg.fisher_cache) if cfg.fisher_cache else out
        cache_dir.mkdir(parents=True, exist_ok=True)
        cache = cache_dir / f"fisher-{cfg.method}-{key}.safetensors"  # is_fisher_cache knows the name
        t0 = time.time()
        # lm_head only at the response tokens, unless it is itself adapted (its hooks expect (B, T, C) inputs)
        fisher_forward = None if "lm_head" in lora.targets else labelled_logits
        if cfg.method == "alignguard":
            if cache.exists():
                basis = load_fisher(cache, model=model, expect=meta)
            else:
                with autocast:
                    basis = estimate_fisher(model, batches, k=agc.k, kind=agc.fisher, targets=lora.targets,
                                            forward=fisher_forward,
                                            generator=torch.Generator(device=device).manual_seed(cfg.seed))
                if master:
                    save_fisher(cache, basis, meta)
        else:
            if cache.exists():
                f_diag = load_diag_fisher(cache, model=model, expect=meta)
            else:
                with autocast:
                    f_diag = diag_fisher(model, batches, targets=lora.targets, forward=fisher_forward)
                if master:
                    save_diag_fisher(cache, f_diag, meta)
        if master:
            print(f"fisher ({cfg.method}): {len(align)} alignment rows, {time.time() - t0:.1f}s -> {cache}", file=sys.stderr)

    if cfg.method == "full":
        model.float().requires_grad_(True)
        params = [p for p in model.parameters()]
    else:
        add_lora(model, lora)
        params = lora_parameters(model)
    params = list({id(p): p for p in params}.values())  # a tied weight appears once
    model.gradient_checkpointing, model.compile_blocks = cfg.grad_checkpoint, cfg.compile
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay,
                                  foreach=device_type == "cuda")
    n_trainable = sum(p.numel() for p in params)

    def penalty():
        """The method's regulariser, in fp32 outside autocast; returns (total, terms for logging)."""
        if cfg.method == "alignguard":
            return penalties(model, basis, agc)
        if cfg.method == "l2":
            r = l2_penalty(model)
            return cfg.lambda_l2 * r, {"l2": r}
        if cfg.method == "ewc":
            r = ewc_penalty(model, f_diag)
            return cfg.lambda_ewc * r, {"ewc": r}
        return None, {}

    @torch.no_grad()
    def evaluate() -> float:
        """Mean token cross-entropy over the whole held-out set, in a fixed order."""
        model.eval()
        loss, n = torch.zeros((), device=device), 0
        for i in range(rank * cfg.batch_size, len(heldout), world * cfg.batch_size):
            b = collate(heldout[i:i + cfg.batch_size], tok.pad_id)
            with autocast:
                loss += batch_loss_sum(model, b["input_ids"].to(device), b["labels"].to(device))
            n += int((b["labels"] != -100).sum())
        stats = torch.tensor([loss.item(), n], dtype=torch.float64, device=device)
        if ddp:
            dist.all_reduce(stats)
        model.train()
        return (stats[0] / stats[1]).item()

    # --- resume
    step, metrics_file = 0, out / "metrics.jsonl"
    if cfg.resume:
        state = load_checkpoint(out, model, optimizer, scaler)
        step = state["step"]
        if master and metrics_file.exists():  # drop log lines written after the checkpoint (or cut by a kill)
            lines = []
            for line in metrics_file.read_text().splitlines():
                try:
                    if json.loads(line)["step"] <= step:
                        lines.append(line)
                except (json.JSONDecodeError, KeyError, TypeError):
                    pass
            metrics_file.write_text("".join(l + "\n" for l in lines))
    if master:
        print(f"{cfg.method}: {n_trainable:,} trainable parameters, {len(task)} task rows, "
              f"{steps_text} of {per_step} rows, {world} process(es), {device}, {cfg.dtype}", file=sys.stderr)

    # --- the loop
    model.train()
    # tokens: every real input token, prompt included; carried over a resume like the last eval loss
    t_start, tokens_seen = time.time(), state.get("tokens", 0) if cfg.resume else 0
    last = {"eval_loss": state["eval_loss"]} if cfg.resume and state.get("eval_loss") is not None else {}
    t_log, tokens_log = time.time(), 0
    first_step = step
    saved_step = step if cfg.resume else None  # the step of the checkpoint in --out
    while step < total_steps:
        if cfg.stop_after and step - first_step == cfg.stop_after:
            if master:
                save_checkpoint(out, step, model, optimizer, scaler, {"eval_loss": last.get("eval_loss"), "tokens": tokens_seen, "run": run})
                print(f"\nstopped after {cfg.stop_after} steps at step {step}; continue with --resume", file=sys.stderr)
            if ddp:
                dist.barrier()
                dist.destroy_process_group()
            release_rm_buffers()
            return {"method": cfg.method, "steps": step, "stopped": True}
        lr = get_lr(step, total_steps, cfg.lr, cfg.min_lr, cfg.warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if cfg.eval_every and step % cfg.eval_every == 0 and step > 0:
            last["eval_loss"] = evaluate()
        if cfg.ckpt_every and step % cfg.ckpt_every == 0 and step > 0:
            if master:
                save_checkpoint(out, step, model, optimizer, scaler, {"eval_loss": last.get("eval_loss"), "tokens": tokens_seen, "run": run})
            saved_step = step
        # dropout noise depends on the step only, so a resumed run draws the same masks
        torch.manual_seed(cfg.seed + rank + 7919 * step)

        # micro-batches: rows [i*world + rank] of this step's slice of the data order
        idx = example_order(len(task), cfg.seed, step * per_step, per_step)
        micro = [collate([task[j] for j in idx[(m * world + rank) * cfg.batch_size:(m * world + rank + 1) * cfg.batch_size]], tok.pad_id)
                 for m in range(cfg.grad_accum)]
        # response tokens (the loss normaliser) and all real tokens (the throughput), every process
        counts = torch.tensor([sum(int((b["labels"] != -100).sum()) for b in micro),
                               sum(int(b["attention_mask"].sum()) for b in micro)], device=device)
        if ddp:
            dist.all_reduce(counts)
        n_step, n_input = counts.tolist()
        task_loss = torch.zeros((), device=device)
        for b in micro:
            with autocast:
                loss_sum = batch_loss_sum(model, b["input_ids"].to(device), b["labels"].to(device))
            loss = normalised_loss(loss_sum, n_step)
            (loss * scaler.scale).backward()
            task_loss += loss.detach()
        if ddp:  # sum over processes: each loss was already divided by the global token count
            dist.all_reduce(task_loss)
            for p in params:
                if p.grad is not None:
                    dist.all_reduce(p.grad)
        pen, terms = penalty()  # identical on every process, so added after the all-reduce
        if pen is not None:
            (pen * scaler.scale).backward()

        for p in params:  # unscale before clipping and before any statistic of the gradient
            if p.grad is not None and scaler.scale != 1.0:
                p.grad.div_(scaler.scale)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        finite = bool(torch.isfinite(grad_norm)) and bool(torch.isfinite(task_loss))
        # loss scaling rescues overflowing fp16 gradients, never a non-finite loss itself
        if not bool(torch.isfinite(task_loss)) or (not finite and not scaler.enabled):
            kept = "no checkpoint was written" if saved_step is None else \
                f"the last checkpoint, of step {saved_step}, is in {out / 'checkpoint'}"
            raise FloatingPointError(f"step {step}: non-finite loss or gradient (task loss {task_loss.item()}, "
                                     f"grad norm {grad_norm.item()}); stopping: {kept}. --resume keeps the run's options, "
                                     "so it would reach this step again: start a new run in another --out with a "
                                     "lower --lr, or --dtype fp32.")
        if scaler.update(finite):
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += n_input
        tokens_log += n_input

        if master and (step % cfg.log_every == 0 or step == total_steps):
            dt = time.time() - t_log
            row = {"step": step, "loss": task_loss.item(), "lr": lr, "grad_norm": grad_norm.item(),
                   "tokens_per_s": tokens_log / max(dt, 1e-9), "tokens": tokens_seen, **last,
                   **{k: v.item() for k, v in terms.items()}}
            if pen is not None:
                row["penalty"] = pen.item()
            if scaler.enabled:
                row["loss_scale"] = scaler.scale
            with open(metrics_file, "a") as f:
                f.write(json.dumps(row) + "\n")
            elapsed = time.time() - t_start
            eta = elapsed / (step - first_step) * (total_steps - step)
            shown = " ".join(f"{k} {row[k]:.3g}" for k in ("R_A", "R_T", "E_rm", "E_geo", "l2", "ewc") if k in row)
            print(f"\rstep {step}/{total_steps} | loss {row['loss']:.4f} {shown} | lr {lr:.2e} | "
                  f"{row['tokens_per_s']:.0f} tok/s | ETA {eta:.0f}s   ", end="", file=sys.stderr, flush=True)
            t_log, tokens_log = time.time(), 0

    release_rm_buffers()  # E_rm's buffers, kept between steps (at most 40 MiB)

    # --- outputs
    final_eval = evaluate()
    summary = {"method": cfg.method, "steps": step, "eval_loss": final_eval, "tokens": tokens_seen,
               "seconds": time.time() - t_start, "trainable_parameters": n_trainable,
               "config": asdict(cfg), "lora": asdict(lora), "alignguard": asdict(agc)}
    if master:
        print(file=sys.stderr)
        save_checkpoint(out, step, model, optimizer, scaler, {"eval_loss": final_eval, "tokens": tokens_seen, "run": run})
        if cfg.method == "full":
            save_model(model, out / "model", tokenizer_from=model_dir,
                       overwrite=True)
        else:
            meta = {"method": cfg.method, "task_rows": len(task), "lambda_l2": cfg.lambda_l2, "lambda_ewc": cfg.lambda_ewc,
                    "alignguard": asdict(agc), "fisher_cache": str(cache) if basis is not None else None,
                    "base_digest": base_digest, "chat_format": tok.chat_format, "max_len": cfg.max_len}
            # the base's directory, absolute: what PEFT's AutoPeftModelForCausalLM loads the base from
            save_adapter(model, out / "adapter", base_model_name_or_path=str(model_dir.resolve()), lora_cfg=lora,
                         meta=meta, overwrite=True)
            if cfg.merge:  # into fp32 base weights, on the CPU: a bf16 or fp16 base was a compute copy
                base = None if base_dtype == torch.float32 else load_model(cfg.ckpt).state_dict()
                save_model(model, out / "merged", state_dict=merged_state_dict(model, base),
                           tokenizer_from=model_dir, overwrite=True)
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(f"{cfg.method}: eval loss {final_eval:.4f} after {step} steps, {summary['seconds']:.0f}s -> {out}", file=sys.stderr)
    if ddp:
        dist.barrier()
        dist.destroy_process_group()
    return summary


# ----------------------------------------------------------------------------- the demo

# the demo's fine-tuning: one epoch at a learning rate where plain LoRA visibly erodes refusal
DEMO_TRAIN = dict(ckpt="data/demo", task="data/sst2.jsonl", align="data/align.jsonl", lr=2e-3, epochs=1.0)
DEMO_EVAL = dict(ckpt="data/demo", task_dev="data/sst2_dev.jsonl", heldout="data/general_heldout.jsonl",
                 align="data/align_heldout.jsonl")


def demo(out: str = "", limit: int = 400, steps: int = 0, methods=("lora", "alignguard")) -> dict:
    """`python train.py` alone: the shipped aligned demo model fine-tuned on the sentiment task with
    each method (DEMO_TRAIN), then DRIFTCHECK
    (a balanced subset of `limit` prompts), task accuracy, forgetting and alignment KL for the base
    model and every adapter, printed as one table and written as report.md / report.json in `out`."""
    out = Path(out or time.strftime("runs/demo-%Y%m%d-%H%M%S"))
    t0 = time.time()
    for method in methods:
        train(TrainConfig(**DEMO_TRAIN, method=method, out=str(out / method), steps=steps), LoRAConfig(),
              AlignGuardConfig())
    ecfg = EvalConfig(**DEMO_EVAL, limit=limit, out=str(out / "report"))
    sets = load_eval_data(ecfg)
    sets["driftcheck"] = balanced_subset(driftcheck_prompts(), limit)
    tok, model = load_tokenizer(ecfg.ckpt), load_model(ecfg.ckpt)
    results = [evaluate_model(model, tok, "base", ecfg, **sets)]
    for method in methods:
        load_adapter(model, out / method / "adapter")
        results.append(evaluate_model(model, tok, method, ecfg, **sets, base=disable_lora, method=method,
                                      adapter=str(out / method / "adapter")))
        remove_lora(model)
    report = compare(results)
    report["seconds"] = time.time() - t0
    text = format_report(report)
    (out / "report.md").write_text(text)
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    print(text)
    print(f"demo: {report['seconds']:.0f}s -> {out}/report.md", file=sys.stderr)
    return report


# ----------------------------------------------------------------------------- command line

def add_dataclass_args(parser, cls, prefix=""):
    helps = field_help(cls)
    group = parser.add_argument_group(cls.__name__)
    for f in fields(cls):
        flag = "--" + (prefix + f.name).replace("_", "-")
        default, h = f.default, helps.get(f.name, "")
        if isinstance(default, bool):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, dest=prefix + f.name,
                               help=f"{h} (default: {'on' if default else 'off'})")
        elif isinstance(default, (tuple, list)):
            group.add_argument(flag, nargs="+", default=list(default), dest=prefix + f.name,
                               help=f"{h} (default: {' '.join(map(str, default))})")
        else:
            group.add_argument(flag, type=type(default), default=default, dest=prefix + f.name,
                               help=f"{h} (default: {default})")


def parse_args(argv=None) -> tuple[TrainConfig, LoRAConfig, AlignGuardConfig]:
    demo = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in DEMO_TRAIN.items())
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=textwrap.fill(f"With no options at all, train.py runs the demo instead "
                                                          f"({demo}; LoRA and AlignGuard-LoRA into runs/demo-<time>, "
                                                          "then the DRIFTCHECK report): the defaults above are "
                                                          "those of a run of your own.", 79))
    add_dataclass_args(parser, TrainConfig)
    add_dataclass_args(parser, LoRAConfig, prefix="lora_")
    add_dataclass_args(parser, AlignGuardConfig)
    args = vars(parser.parse_args(argv))

    def build(cls, prefix=""):
        kw = {f.name: args[prefix + f.name] for f in fields(cls)}
        for f in fields(cls):
            if isinstance(f.default, tuple):
                kw[f.name] = tuple(kw[f.name])
        return cls(**kw)

    return build(TrainConfig), build(LoRAConfig, "lora_"), build(AlignGuardConfig)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        if not argv:
            return demo()
        cfg, lora, agc = parse_args(argv)
        return train(cfg, lora, agc)
    except (ValueError, OSError, FloatingPointError) as e:  # bad input, unreadable or unwritable files
        print(f"\nerror: {e}", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()

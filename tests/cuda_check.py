"""The mixed-precision check of train.py on a GPU (issue 4, point 8), as one prepared run.

    python tests/cuda_check.py                                 # CUDA: ~108M model, fp32 vs bf16 vs fp16, 50 steps each
    python tests/cuda_check.py --device cpu --shape small --steps 12 --dtypes fp32 bf16   # the same script, checked on a CPU
    python tests/cuda_check.py --compile                       # the same runs with train.py --compile

A random-weight Llama of SmolLM2-135M's shape (its vocabulary replaced by the demo tokenizer's 3,072 tokens:
108M parameters) is saved as a checkpoint beside the demo tokenizer, then fine-tuned by train.train itself,
`--method lora` on every linear layer (r 8), once per dtype, on the demo world's pretraining text
(data/demo_pretrain.jsonl: plain language modelling, so every token of a row is a loss token). Every run sees the
same rows in the same order from the same initialisation, so the fp32 losses are the reference the others must
track. Printed per dtype:

  - the loss at steps 1, 10, 25, 50 and the largest and mean relative difference from fp32 over all steps;
    verdict: mean |Δ| / fp32 <= --tol-mean and, over the last 10 steps, <= --tol-final;
  - fp16 only: the final loss scale and the number of skipped (overflowed) steps;
  - tokens/s (median over the steps after --skip warm-up steps, from metrics.jsonl, every real input token);
  - MFU: achieved FLOP/s over the measured matmul peak (one large torch.mm in that dtype; TF32 stays off, as in
    train.py, so fp32 is measured against fp32's own peak). FLOPs count the linear layers only, 4·N + 6·N_lora
    per token (forward, backward to the inputs, LoRA's own three products), without lm_head (train.py applies
    it only at labelled positions) and attention: a lower bound.

Exit status 1 when a dtype misses a tolerance. Also worth running in the same session (issue 7, MFU of a 1B shape,
eager and with compiled blocks), as a command of its own: a reviewer estimated 5-7 minutes on an H200 (12 worker
processes, 4 of them compiling). Each worker is bounded, and each one's result is appended to
$OUT/bench-1b.json.workers.jsonl as it comes, so a run stopped by the outer timeout keeps what it measured:
    timeout 570 python tests/bench.py --shape 1b --device cuda --dtype bf16 --no-eigh --quick --compile \
        --worker-timeout 150 --json $OUT/bench-1b.json
"""

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import train  # noqa: E402
from alignguard import AlignGuardConfig, LoRAConfig  # noqa: E402
from model import Llama, init_weights, save_model  # noqa: E402
from bench import SHAPES, matmul_peak  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def make_checkpoint(folder: Path, shape: str, seed: int) -> Llama:
    """A random-weight model of the shape with the demo tokenizer's vocabulary, saved as an HF directory."""
    tok_vocab = json.loads((ROOT / "data" / "demo" / "config.json").read_text())["vocab_size"]
    cfg = replace(SHAPES[shape].model, vocab_size=tok_vocab)
    model = init_weights(Llama(cfg), seed=seed)
    save_model(model, folder, tokenizer_from=ROOT / "data" / "demo", overwrite=True)
    return model


def linear_flops_per_token(model: Llama, r: int) -> float:
    """4·N + 6·N_lora over every nn.Linear but lm_head (all of them adapted, all-linear)."""
    lin = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")]
    N = sum(m.in_features * m.out_features for m in lin)
    N_lora = sum(r * (m.in_features + m.out_features) for m in lin)
    return 4 * N + 6 * N_lora


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--shape", default="smollm", choices=[s for s in SHAPES if not SHAPES[s].cuda_only])
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16", "fp16"], choices=list(DTYPES))
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--skip", type=int, default=5, help="warm-up steps left out of tokens/s")
    p.add_argument("--tol-mean", type=float, default=0.02, help="largest mean relative loss difference from fp32")
    p.add_argument("--tol-final", type=float, default=0.03, help="the same over the last 10 steps")
    p.add_argument("--out", default="", help="keep the runs here (default: a temporary directory, removed)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile", action="store_true", help="train.py --compile: the blocks through torch.compile "
                   "(the first step compiles; --skip leaves it out of tokens/s)")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device (use --device cpu to check the script)")
    if "fp32" not in args.dtypes:
        args.dtypes = ["fp32", *args.dtypes]  # the reference

    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="cuda_check_"))
    work.mkdir(parents=True, exist_ok=True)
    dev = args.device if args.device != "cuda" else "cuda:0"
    gpu = torch.cuda.get_device_name(dev) if dev.startswith("cuda") else "cpu"
    print(f"# torch {torch.__version__} | {gpu} | shape {args.shape} | {args.steps} steps, B={args.batch_size}, "
          f"max_len {args.max_len}, LoRA r=8 all-linear, lr {args.lr}{', compiled blocks' if args.compile else ''}")
    try:
        ckpt = work / "ckpt"
        model = make_checkpoint(ckpt, args.shape, args.seed)
        n_params = sum(p.numel() for p in model.parameters())
        flops_tok = linear_flops_per_token(model, r=8)
        del model
        print(f"# {n_params / 1e6:.1f}M parameters, {flops_tok / 1e9:.3f} GFLOP per token (linear layers)")

        runs = {}
        for name in args.dtypes:
            cfg = train.TrainConfig(ckpt=str(ckpt), task=str(ROOT / "data" / "demo_pretrain.jsonl"), out=str(work / name),
                                    method="lora", dtype=name, device=args.device, batch_size=args.batch_size,
                                    max_len=args.max_len, steps=args.steps, lr=args.lr, min_lr=args.lr / 10, warmup=5,
                                    eval_every=0, eval_size=64, ckpt_every=0, log_every=1, seed=args.seed,
                                    compile=args.compile)
            t0 = time.time()
            train.train(cfg, LoRAConfig(r=8, alpha=16, targets="all-linear"), AlignGuardConfig())
            runs[name] = {"rows": read_metrics(work / name), "seconds": time.time() - t0}
            if dev.startswith("cuda"):
                runs[name]["peak_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
                torch.cuda.reset_peak_memory_stats(dev)

        ref = [r["loss"] for r in runs["fp32"]["rows"]]
        failed = False
        head = f"{'dtype':<5} {'loss@1':>8} {'@10':>8} {'@25':>8} {'@50':>8} {'max|Δ|':>8} {'mean|Δ|':>8} {'last10':>8} " \
               f"{'tok/s':>9} {'MFU':>6} {'peak':>8}  verdict"
        print(head)
        for name, run in runs.items():
            loss = [r["loss"] for r in run["rows"]]
            rel = [abs(a - b) / abs(b) for a, b in zip(loss, ref)]
            mean_rel, last_rel = statistics.mean(rel), statistics.mean(rel[-10:])
            tps = statistics.median(r["tokens_per_s"] for r in run["rows"][args.skip:]) if len(loss) > args.skip else float("nan")
            peak = matmul_peak(DTYPES[name], "cuda" if dev.startswith("cuda") else "cpu", reps=5)
            mfu = tps * flops_tok / peak
            at = lambda s: f"{loss[s - 1]:8.4f}" if s <= len(loss) else f"{'-':>8}"  # noqa: E731
            ok = name == "fp32" or (mean_rel <= args.tol_mean and last_rel <= args.tol_final)
            failed |= not ok
            verdict = "reference" if name == "fp32" else ("ok" if ok else "MISSED")
            extra = ""
            if name == "fp16":
                scales = [65536.0] + [r["loss_scale"] for r in run["rows"]]  # TrainConfig.loss_scale, then per step
                skipped = sum(1 for a, b in zip(scales, scales[1:]) if b < a)
                extra = f"  (loss scale {run['rows'][-1]['loss_scale']:g}, {skipped} skipped steps)"
            mem = f"{run['peak_gib']:6.2f}Gi" if "peak_gib" in run else f"{'-':>8}"
            print(f"{name:<5} {at(1)} {at(10)} {at(25)} {at(50)} {max(rel):8.2%} {mean_rel:8.2%} {last_rel:8.2%} "
                  f"{tps:9,.0f} {mfu:6.1%} {mem}  {verdict}{extra}  [{run['seconds']:.0f}s, mm peak {peak / 1e12:.1f} TFLOP/s]")
        return 1 if failed else 0
    finally:
        if not args.out:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

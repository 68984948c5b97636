"""The λ sweep behind the demo's defaults (a script, not a test): fine-tune the demo model on the
sentiment task with each setting, then score refusal on the world's VALIDATION prompts (wording held
out from training and distinct from DRIFTCHECK, so the defaults are not tuned on the benchmark),
SST-2 dev accuracy and the alignment KL. Prints a Markdown table (the one in README.md).

    python tests/sweep_demo.py                     # ~10 minutes on 2 cores
    python tests/sweep_demo.py --n-val 200 --only lora ag_A1e3
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from alignguard import AlignGuardConfig, LoRAConfig, load_adapter, remove_lora  # noqa: E402
from data import demo_validation, load_tokenizer, read_align, read_mc  # noqa: E402
from eval import alignment_kl, mc_accuracy, score_driftcheck  # noqa: E402
from model import load_model  # noqa: E402
from train import DEMO_TRAIN, TrainConfig, train  # noqa: E402

# name -> (method, AlignGuardConfig overrides, TrainConfig overrides)
SETTINGS = {
    "lora": ("lora", {}, {}),
    "l2": ("l2", {}, {"lambda_l2": 1e-1}),
    "ewc": ("ewc", {}, {"lambda_ewc": 1e4}),
    **{f"ag_A{la:.0e}".replace("+0", ""): ("alignguard", {"lambda_a": la, "lambda_t": 0.0, "lambda_nc": 0.0}, {})
       for la in (1e2, 1e3, 1e4, 1e5)},
    "ag_T1e-2": ("alignguard", {"lambda_a": 0.0, "lambda_t": 1e-2, "lambda_nc": 0.0}, {}),
    "ag_NC1e-1": ("alignguard", {"lambda_a": 0.0, "lambda_t": 0.0, "lambda_nc": 1e-1}, {}),
    "ag_no_T": ("alignguard", {"lambda_t": 0.0}, {}),
    "ag_no_NC": ("alignguard", {"lambda_nc": 0.0}, {}),
    "ag_default": ("alignguard", {}, {}),
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/sweep")
    parser.add_argument("--n-val", type=int, default=400, help="validation prompts (half unsafe)")
    parser.add_argument("--only", nargs="*", default=None, help="names of SETTINGS to run")
    args = parser.parse_args(argv)
    os.chdir(ROOT)  # the demo's paths are relative to the repository
    out = Path(args.out)
    ckpt = DEMO_TRAIN["ckpt"]
    tok, model = load_tokenizer(ckpt), load_model(ckpt)
    val, dev = demo_validation(args.n_val), read_mc(str(ROOT / "data" / "sst2_dev.jsonl"))
    align = read_align(str(ROOT / "data" / "align_heldout.jsonl"))

    def measure(name):
        dc = score_driftcheck(model, tok, val, progress=False)["metrics"]
        acc = mc_accuracy(model, tok, dev)["accuracy"]["rate"]
        kl = alignment_kl(model, tok, align)["kl"] if name != "base" else 0.0
        return dc["RR_u"]["rate"], dc["RR_s"]["rate"], acc, kl

    rows = [("base", "–", *measure("base"), None, 0.0)]
    for name, (method, ag_kw, tr_kw) in SETTINGS.items():
        if args.only and name not in args.only:
            continue
        t0 = time.time()
        run = out / name
        if not (run / "adapter").exists():
            cfg = TrainConfig(**{**DEMO_TRAIN, "method": method, "out": str(run), "fisher_cache": str(out / "cache"), **tr_kw})
            train(cfg, LoRAConfig(), AlignGuardConfig(**ag_kw))
        load_adapter(model, run / "adapter")
        task_loss = json.loads((run / "summary.json").read_text())["eval_loss"]
        rows.append((name, " ".join(f"{k}={v:g}" for k, v in {**ag_kw, **tr_kw}.items()) or "defaults",
                     *measure(name), task_loss, time.time() - t0))
        remove_lora(model)
    base_rr = rows[0][2]
    print("\n| setting | λ | refusal unsafe (val) | drift | over-refusal safe (val) | SST-2 dev acc "
          "| held-out task loss | align KL |")
    print("|---|---|---|---|---|---|---|---|")
    for name, lam, rr_u, rr_s, acc, kl, task_loss, sec in rows:
        drift = (base_rr - rr_u) / base_rr if base_rr else float("nan")
        loss = "–" if task_loss is None else f"{task_loss:.4f}"
        print(f"| {name} | {lam} | {100 * rr_u:.1f}% | {100 * drift:.1f}% | {100 * rr_s:.1f}% | {100 * acc:.1f}% "
              f"| {loss} | {kl:.4f} |")


if __name__ == "__main__":
    main()

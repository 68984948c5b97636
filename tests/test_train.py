"""train.py: schedule, loss normalisation, accumulation, resume, precision, processes, outputs and
failures, on the tiny checkpoint of conftest.py."""

import argparse
import copy
import json
import re
import math
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, fields
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import alignguard
import train
from alignguard import (AlignGuardConfig, LoRAConfig, add_lora, diag_fisher, kfac_factors, load_fisher, lora_modules,
                        lora_parameters, penalties)
from conftest import REFUSAL, SENTIMENT, write_jsonl
from data import collate, encode_example, load_tokenizer, read_task
from model import checkpoint_digest, load_model

ROOT = Path(__file__).resolve().parents[1]


def run(tiny_ckpt, task_file, align_file, out, *extra):
    argv = ["--ckpt", str(tiny_ckpt), "--task", str(task_file), "--align", str(align_file), "--out", str(out),
            "--batch-size", "4", "--eval-size", "8", "--max-len", "64", "--log-every", "1", "--eval-every", "0",
            "--lr", "1e-2", "--warmup", "2", "--k", "4", "--n-align", "8", "--fisher-batch", "4", *extra]
    return train.main(argv)


def adapter(out):
    return load_file(str(Path(out) / "adapter" / "adapter_model.safetensors"))


@dataclass
class PercentOpts:  # a field comment holding a '%', for add_dataclass_args
    share: float = 0.5  # rows kept, 50% by default


def test_help_lists_every_option(capsys):
    """`python train.py --help` (README: it lists every option with its default): a '%' in a field's comment
    once made argparse raise instead."""
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for cls, prefix in ((train.TrainConfig, ""), (LoRAConfig, "lora_"), (train.AlignGuardConfig, "")):
        for f in fields(cls):
            assert "--" + (prefix + f.name).replace("_", "-") in text, f.name
    parser = argparse.ArgumentParser()
    train.add_dataclass_args(parser, PercentOpts)
    assert "50% by default (default: 0.5)" in parser.format_help()


def test_get_lr_boundaries():
    lr, min_lr, warmup, total = 1e-3, 1e-4, 10, 100
    assert train.get_lr(0, total, lr, min_lr, warmup) == pytest.approx(lr / warmup)
    assert train.get_lr(warmup - 1, total, lr, min_lr, warmup) == pytest.approx(lr)
    assert train.get_lr(warmup, total, lr, min_lr, warmup) == pytest.approx(lr)  # cosine starts at the peak
    mid = warmup + (total - warmup) // 2
    assert train.get_lr(mid, total, lr, min_lr, warmup) == pytest.approx((lr + min_lr) / 2)
    assert train.get_lr(total, total, lr, min_lr, warmup) == pytest.approx(min_lr)
    assert train.get_lr(total + 5, total, lr, min_lr, warmup) == pytest.approx(min_lr)
    lrs = [train.get_lr(s, total, lr, min_lr, warmup) for s in range(warmup, total + 1)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_example_order_is_a_pure_function_of_position():
    full = train.example_order(7, seed=3, start=0, count=30)
    assert sorted(full[:7]) == list(range(7)) and sorted(full[7:14]) == list(range(7))
    assert train.example_order(7, seed=3, start=11, count=9) == full[11:20]


def test_accumulation_equals_one_big_batch(tiny_ckpt, task_file):
    """k micro-batches with different token counts give the gradient of one batch of all their rows."""
    tok = load_tokenizer(tiny_ckpt)
    rows = [encode_example(tok, p, r, 64)[:2] for p, r in read_task(task_file)[:6]]
    # rows of different lengths so the micro-batches hold different numbers of response tokens
    rows[0] = encode_example(tok, "a much longer prompt " * 3, "positive and also a much longer response", 64)[:2]

    def grads(micro, naive=False):
        torch.manual_seed(0)
        model = load_model(tiny_ckpt, dtype=torch.float64)
        add_lora(model, LoRAConfig(r=4, targets=("q_proj", "v_proj", "down_proj")))
        with torch.no_grad():
            for p in lora_parameters(model):
                p.normal_(0, 0.1)
        n = sum(int((collate(m, tok.pad_id)["labels"] != -100).sum()) for m in micro)
        for m in micro:
            b = collate(m, tok.pad_id)
            n_b = int((b["labels"] != -100).sum()) * len(micro) if naive else n  # naive: mean of means
            train.normalised_loss(train.batch_loss_sum(model, b["input_ids"], b["labels"]), n_b).backward()
        return torch.cat([p.grad.flatten() for p in lora_parameters(model)])

    one = grads([rows])
    three = grads([rows[:1], rows[1:4], rows[4:]])
    scale = one.abs().max()
    assert (one - three).abs().max() < 1e-5 * scale, f"{(one - three).abs().max():.2e} vs {scale:.2e}"
    # the mean of per-micro-batch means is a different gradient: the normalisation matters
    assert (one - grads([rows[:1], rows[1:4], rows[4:]], naive=True)).abs().max() > 1e-2 * scale


def autograd_step_gradient(model, micro, penalty):
    """The gradient a step should take, by autograd in fp64 on a copy of the model: d/dθ of the task loss, the sum of
    the token cross-entropies of all micro-batches (from the full logits) over their total token count, plus the
    penalty."""
    ref = copy.deepcopy(model).double()
    n = sum(int((b["labels"] != -100).sum()) for b in micro)
    loss = sum(F.cross_entropy(ref(b["input_ids"]).flatten(0, 1), b["labels"].flatten(), ignore_index=-100,
                               reduction="sum") for b in micro) / n
    params = lora_parameters(ref)
    return torch.autograd.grad(loss + penalty(ref), params, retain_graph=True), torch.autograd.grad(loss, params)


@pytest.mark.parametrize("method", ["lora", "l2", "alignguard"])
def test_train_step_gradient_is_the_token_mean_loss_plus_penalty(tiny_ckpt, align_file, tmp_path, monkeypatch, method):
    """The unscaled gradient train() clips and steps with (caught at clip_grad_norm_), at each of 2 steps of 2
    micro-batches holding different numbers of response tokens, equals autograd_step_gradient: a token-weighted
    mean over both micro-batches (not a mean of their means), plus the method's penalty, λ Σ ||s·B·A||² for l2
    and alignguard.penalties with the run's Fisher basis. At the second step B ≠ 0, where the penalty has a
    gradient; it must be a visible part of the total."""
    responses = ["positive", "no", "sure . here is a helpful answer . " * 3, "negative and dull", REFUSAL, "ok"]
    task = write_jsonl(tmp_path / "task.jsonl", [{"prompt": f"{s} ?", "response": responses[i % len(responses)]}
                                                 for i, s in enumerate(SENTIMENT * 2)])
    seen = {"batches": [], "steps": []}
    real_add_lora, real_collate, real_clip = train.add_lora, train.collate, torch.nn.utils.clip_grad_norm_
    out, lam = tmp_path / "o", 10.0

    def add_lora(model, cfg):  # the model train() adapts and trains
        seen["model"] = model
        return real_add_lora(model, cfg)

    def collate(rows, pad_id):  # every batch train() builds: the Fisher's, then each step's micro-batches
        seen["batches"].append(real_collate(rows, pad_id))
        return seen["batches"][-1]

    def penalty(ref):
        if method == "l2":
            return lam * sum((m.scaling * m.lora_B.weight @ m.lora_A.weight).pow(2).sum()
                             for m in lora_modules(ref).values())
        if method == "alignguard":
            basis = {n: fb.to("cpu", torch.float64) for n, fb in load_fisher(next(out.glob("fisher-*"))).items()}
            return penalties(ref, basis, AlignGuardConfig())[0]
        return 0

    def clip(params, max_norm):  # called with the unscaled gradients, before they are clipped
        micro = seen["batches"][-2:]  # this step's 2 micro-batches
        seen["steps"].append(([int((b["labels"] != -100).sum()) for b in micro], [p.grad.clone() for p in params],
                              *autograd_step_gradient(seen["model"], micro, penalty)))
        return real_clip(params, max_norm)

    monkeypatch.setattr(train, "add_lora", add_lora)
    monkeypatch.setattr(train, "collate", collate)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    run(tiny_ckpt, task, align_file, out, "--steps", "2", "--method", method, "--grad-accum", "2", "--batch-size",
        "2", "--lambda-l2", str(lam), "--eval-size", "4")
    assert len(seen["steps"]) == 2
    for step, (counts, got, want, task_only) in enumerate(seen["steps"]):
        got, want, task_only = (torch.cat([g.flatten().double() for g in gs]) for gs in (got, want, task_only))
        assert counts[0] != counts[1], counts
        err, scale = (got - want).abs().max().item(), want.abs().max().item()
        assert err < 1e-5 * scale, f"step {step} ({counts} tokens): gradient {err:.2e} off, of {scale:.2e}"
        if step == 1 and method != "lora":
            share = ((want - task_only).norm() / want.norm()).item()
            assert share > 1e-2, f"the {method} penalty is {share:.1e} of the gradient: too small to test"


def test_resume_is_bit_exact(tiny_ckpt, task_file, align_file, tmp_path):
    extra = ["--steps", "6", "--ckpt-every", "3", "--lora-dropout", "0.1", "--eval-every", "2"]
    run(tiny_ckpt, task_file, align_file, tmp_path / "a", *extra)
    run(tiny_ckpt, task_file, align_file, tmp_path / "b", *extra, "--stop-after", "3")
    assert not (tmp_path / "b" / "adapter").exists()
    assert not alignguard._RM_WORKSPACE  # E_rm's kept buffers are freed when a run stops, as when it ends
    run(tiny_ckpt, task_file, align_file, tmp_path / "b", *extra, "--resume")
    assert not alignguard._RM_WORKSPACE
    a, b = adapter(tmp_path / "a"), adapter(tmp_path / "b")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    def rows(out):  # the log of a resumed run equals the uninterrupted one's, but for timings
        return [{k: v for k, v in json.loads(l).items() if k != "tokens_per_s"}
                for l in (tmp_path / out / "metrics.jsonl").read_text().splitlines()]

    assert [r["step"] for r in rows("b")] == [1, 2, 3, 4, 5, 6]
    assert rows("a") == rows("b")


def test_fp16_resume_restores_the_loss_scaler(tiny_ckpt, task_file, align_file, tmp_path):
    """--dtype fp16 (autocast on the CPU) from a loss scale of 2^20, whose gradients overflow at the first two steps
    (skipped, scale halved to 2^18), stopped after step 3 and resumed: the scale and its count of good steps come
    back from the checkpoint, so the log (loss scales, losses), the final scaler and the adapter equal the
    uninterrupted run's. Restarting from --loss-scale would skip two more steps."""
    extra = ["--steps", "6", "--dtype", "fp16", "--method", "lora", "--loss-scale", str(2.0 ** 20)]
    run(tiny_ckpt, task_file, align_file, tmp_path / "a", *extra)
    run(tiny_ckpt, task_file, align_file, tmp_path / "b", *extra, "--stop-after", "3")

    def scaler(out):
        s = json.loads((tmp_path / out / "checkpoint" / "state.json").read_text())["scaler"]
        return s["scale"], s["good_steps"]

    assert scaler("b") == (2.0 ** 18, 1)
    run(tiny_ckpt, task_file, align_file, tmp_path / "b", *extra, "--resume")

    def rows(out):
        return [{k: v for k, v in json.loads(l).items() if k != "tokens_per_s"}
                for l in (tmp_path / out / "metrics.jsonl").read_text().splitlines()]

    assert [r["loss_scale"] for r in rows("a")] == [2.0 ** 19] + [2.0 ** 18] * 5
    assert rows("a") == rows("b") and scaler("a") == scaler("b") == (2.0 ** 18, 4)
    a, b = adapter(tmp_path / "a"), adapter(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_other_options_or_data_and_a_missing_checkpoint(tiny_ckpt, task_file, align_file, tmp_path,
                                                                        capsys, monkeypatch):
    """A resumed run continues the one in --out: another method, lr, rank, seed or task file would have mixed two
    runs into one adapter (accepted before, or a shape traceback for another rank)."""
    out = tmp_path / "o"
    run(tiny_ckpt, task_file, align_file, out, "--steps", "4", "--method", "lora", "--stop-after", "2")
    before = sorted(p.name for p in out.iterdir())
    other_task = tmp_path / "other.jsonl"
    other_task.write_text(task_file.read_text() + task_file.read_text().splitlines()[0] + "\n")  # one row more
    for change, message in ((["--method", "l2"], "--method: 'lora' -> 'l2'"), (["--lr", "1e-3"], "--lr: 0.01 -> 0.001"),
                            (["--lora-r", "4"], "--lora-r: 8 -> 4"), (["--steps", "6"], "--steps: 4 -> 6"),
                            (["--task", str(other_task)], "the content of --task")):
        with pytest.raises(SystemExit):
            run(tiny_ckpt, task_file, align_file, out, "--steps", "4", "--method", "lora", *change, "--resume")
        err = capsys.readouterr().err
        assert "--resume with other options or data than the run it holds" in err and message in err, err
        assert sorted(p.name for p in out.iterdir()) == before
    # another checkpoint of the same shape, or one whose weights changed in place, is another base model
    other_ckpt = tmp_path / "other_ckpt"
    shutil.copytree(tiny_ckpt, other_ckpt)
    weights = load_file(str(other_ckpt / "model.safetensors"))
    weights["model.norm.weight"] = weights["model.norm.weight"] * 1.01
    save_file(weights, str(other_ckpt / "model.safetensors"))
    with pytest.raises(SystemExit):
        run(other_ckpt, task_file, align_file, out, "--steps", "4", "--method", "lora", "--resume")
    assert "the content of --ckpt" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == before
    # what only decides when to log, evaluate or stop may change, and the same files and targets may be spelled
    # differently: --out with a slash, the task file by a relative path, the targets in another order, the
    # checkpoint copied elsewhere; --compile, which changes how the steps are computed, may be added (its blocks
    # counted here, eagerly: test_compiled_blocks_give_the_loss_and_gradients_of_eager compiles them)
    import model as model_py
    calls = []
    monkeypatch.setattr(model_py, "compiled_block", lambda: lambda *a: calls.append(1) or model_py._call(*a))
    monkeypatch.chdir(task_file.parent)
    shutil.copytree(tiny_ckpt, tmp_path / "moved_ckpt")
    run(tmp_path / "moved_ckpt", task_file.name, align_file, f"{out}/", "--steps", "4", "--method", "lora",
        "--log-every", "2", "--lora-targets", "v_proj", "o_proj", "q_proj", "k_proj", "--compile", "--resume")
    assert json.loads((out / "summary.json").read_text())["steps"] == 4
    layers = json.loads((tiny_ckpt / "config.json").read_text())["num_hidden_layers"]
    assert len(calls) == 2 * layers  # the two resumed steps' forwards, every block; evaluation stays eager
    # an optimizer state cut short is named
    opt = out / "checkpoint" / "optimizer.pt"
    opt.write_bytes(opt.read_bytes()[:100])
    with pytest.raises(SystemExit):
        run(tiny_ckpt, task_file, align_file, out, "--steps", "4", "--method", "lora", "--resume")
    assert f"error: {opt}: not a readable optimizer state" in capsys.readouterr().err
    # a missing alignment set is named as missing, not as an option the resumed run lacks
    with pytest.raises(SystemExit):
        run(tiny_ckpt, task_file, tmp_path / "gone.jsonl", tmp_path / "o2", "--steps", "2")
    assert "error: --align " + str(tmp_path / "gone.jsonl") + ": no such file" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()
    # no checkpoint: refused before the Fisher is estimated or anything is written
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit):
        run(tiny_ckpt, task_file, align_file, tmp_path / "empty", "--steps", "2", "--resume")
    assert "there is no checkpoint/ to resume from" in capsys.readouterr().err
    assert not any((tmp_path / "empty").iterdir())


def test_check_resume_compares_every_field_of_both_records(tmp_path):
    """A data file given then and not now, or now and not then, and another number of processes (the rows of a
    step) are refused; a record from before the model digest and the process count were kept is compared on the
    rest (check_resume once looked only at the fields of the new run)."""
    run_ = {"train": {"lr": 0.01, "log_every": 1}, "processes": {"world": 2},
            "data": {"model": "m", "task": "t", "eval_task": "e"}}
    train.check_resume(tmp_path, json.loads(json.dumps(run_)), {**run_, "train": {"lr": 0.01, "log_every": 5}})
    for now, message in (({**run_, "data": {"model": "m", "task": "t"}}, "--eval-task not given now"),
                         ({**run_, "data": {**run_["data"], "align": "a"}}, "--align not given then"),
                         ({**run_, "processes": {"world": 1}}, "the number of processes: 2 -> 1"),
                         ({**run_, "data": {**run_["data"], "model": "x"}}, "the content of --ckpt")):
        with pytest.raises(ValueError, match=f"other options or data than the run it holds \\({message}\\)"):
            train.check_resume(tmp_path, run_, now)
    init = {**run_, "train": {**run_["train"], "init": "/m/config.json"}}
    with pytest.raises(ValueError, match=r"\(the content of --init\)"):
        train.check_resume(tmp_path, init, {**init, "data": {**run_["data"], "model": "x"}})
    # a record without the model digest or the process count (before they were kept): its --ckpt path is compared
    now = {**run_, "train": {**run_["train"], "ckpt": "/m/tiny"}}
    older = {"train": now["train"], "data": {"task": "t", "eval_task": "e"}}
    train.check_resume(tmp_path, older, now)
    with pytest.raises(ValueError, match=r"--lr: 0.01 -> 0.1\)"):
        train.check_resume(tmp_path, older, {**now, "train": {**now["train"], "lr": 0.1}})
    with pytest.raises(ValueError, match=r"--ckpt: '/m/tiny' -> '/m/other'\)"):
        train.check_resume(tmp_path, older, {**now, "train": {**now["train"], "ckpt": "/m/other"}})
    train.check_resume(tmp_path, {**older, "data": now["data"]}, {**now, "train": {**now["train"], "ckpt": "/m/other"}})
    # an --init run's old record: its --init path is compared, not the unused default --ckpt
    older_init = {"train": {**init["train"], "ckpt": "/a/data/demo"}, "data": {"task": "t", "eval_task": "e"}}
    train.check_resume(tmp_path, older_init, {**init, "train": {**init["train"], "ckpt": "/b/data/demo"}})
    with pytest.raises(ValueError, match=r"--init: '/m/config.json' -> '/n/config.json'\)"):
        train.check_resume(tmp_path, older_init, {**init, "train": {**init["train"], "init": "/n/config.json"}})


@pytest.mark.parametrize("option, message", [
    (["--eval-size", "0"], "--eval-size must be at least 1, got 0"),
    (["--fisher-batch", "0"], "--fisher-batch must be at least 1"),
    (["--n-align", "0"], "--n-align must be at least 1"),
    (["--steps", "-3"], "--steps must be 0 or more, got -3"),
    (["--epochs", "0"], "--epochs must be a finite number more than 0"),
    (["--epochs", "inf"], "--epochs must be a finite number more than 0, got inf"),
    (["--lr", "-1"], "--lr must be a finite number more than 0, got -1.0"),
    (["--lr", "nan"], "--lr must be a finite number more than 0, got nan"),
    (["--weight-decay", "-5"], "--weight-decay must be a finite number >= 0"),
    (["--loss-scale", "0"], "--loss-scale must be a finite number more than 0"),
    (["--lambda-l2", "-1", "--method", "l2"], "--lambda-l2 must be a finite number >= 0"),
    (["--lambda-ewc", "-1", "--method", "ewc"], "--lambda-ewc must be a finite number >= 0"),
    (["--device", "tpu"], "--device must be auto, cpu, cuda or cuda:N, got 'tpu'"),
    (["--eval-task", "NOFILE"], "--eval-task .*nofile: no such file"),
    (["--init", "NOFILE", "--method", "full"], "--init .*nofile: no such file"),
    (["--lambda-a", "nan"], r"AlignGuardConfig.lambda_a \(--lambda-a\) must be a finite number >= 0, got nan"),
    (["--alpha", "2"], r"AlignGuardConfig.alpha \(--alpha\) must be in \[0, 1\], got 2.0"),
    (["--k", "0"], r"AlignGuardConfig.k \(--k\) must be at least 1"),
    (["--lora-r", "0"], r"LoRAConfig.r \(--lora-r\) must be at least 1, got 0"),
    (["--lora-alpha", "0"], r"LoRAConfig.alpha \(--lora-alpha\) must be a finite number other than 0"),
    (["--merge", "--method", "full"], "--merge merges a LoRA adapter"),
    (["--out", "FILE"], "is a file, not a directory"),
    (["--fisher-cache", "FILE"], "--fisher-cache .* is a file, not a directory"),
])
def test_bad_options_are_named(tiny_ckpt, task_file, align_file, tmp_path, capsys, option, message):
    (tmp_path / "file").write_text("mine")
    option = [str(tmp_path / "file") if o == "FILE" else str(tmp_path / "nofile") if o == "NOFILE" else o
              for o in option]
    with pytest.raises(SystemExit):
        run(tiny_ckpt, task_file, align_file, tmp_path / "o", *option)
    err = capsys.readouterr().err
    assert re.search(message, err) and "Traceback" not in err, err
    assert (tmp_path / "file").read_text() == "mine" and not (tmp_path / "o").exists()


def test_bf16_on_cpu_trains(tiny_ckpt, task_file, align_file, tmp_path):
    run(tiny_ckpt, task_file, align_file, tmp_path / "o", "--steps", "25", "--dtype", "bf16", "--method", "lora",
        "--lr", "3e-2")
    losses = [json.loads(l)["loss"] for l in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < 0.5 * losses[0], losses


def test_fp16_loss_scaler_skips_overflowing_steps(tiny_ckpt, task_file, align_file, tmp_path):
    s = train.LossScaler(scale=8.0, interval=2)
    assert s.update(False) is False and s.scale == 4.0
    assert s.update(True) and s.update(True) and s.scale == 8.0 and s.good_steps == 0
    # a scale of 2^60 overflows fp16 gradients: every step is skipped and the scale halves each time
    run(tiny_ckpt, task_file, align_file, tmp_path / "o", "--steps", "3", "--dtype", "fp16", "--method", "lora",
        "--loss-scale", str(2.0 ** 60))
    rows = [json.loads(l) for l in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss_scale"] for r in rows] == [2.0 ** 59, 2.0 ** 58, 2.0 ** 57]
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert all(not k.endswith("lora_B.weight") or v.abs().max() == 0 for k, v in adapter(tmp_path / "o").items())
    # a sane scale trains
    run(tiny_ckpt, task_file, align_file, tmp_path / "p", "--steps", "3", "--dtype", "fp16", "--method", "lora")
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in adapter(tmp_path / "p").items())


def test_cli_writes_every_output_and_peft_loads_the_adapter(tiny_ckpt, task_file, align_file, tmp_path):
    out = tmp_path / "o"
    summary = run(tiny_ckpt, task_file, align_file, out, "--steps", "4", "--merge")
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "metrics.jsonl",
                 "summary.json", "checkpoint/trainable.safetensors", "checkpoint/optimizer.pt",
                 "checkpoint/state.json", "merged/model.safetensors", "merged/config.json"):
        assert (out / name).is_file(), name
    assert list(out.glob("fisher-alignguard-*.safetensors"))
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "R_A", "R_T", "E_rm", "E_geo"):
        assert key in rows[-1], key
    assert math.isfinite(summary["eval_loss"])
    meta = json.loads((out / "adapter" / "alignguard.json").read_text())["meta"]
    assert meta["base_digest"] == checkpoint_digest(tiny_ckpt) and meta["chat_format"] == "chatml"
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_ckpt.resolve())  # where PEFT's AutoPeftModel finds the base

    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    base = transformers.LlamaForCausalLM.from_pretrained(tiny_ckpt).eval()
    tuned = peft.PeftModel.from_pretrained(base, out / "adapter").eval()
    merged = transformers.LlamaForCausalLM.from_pretrained(out / "merged").eval()
    ids = torch.randint(0, 100, (2, 12))
    with torch.no_grad():
        a, b = tuned(ids).logits, merged(ids).logits
    assert (a - b).abs().max() < 1e-4


def test_merge_of_a_bf16_run_adds_delta_w_to_the_fp32_checkpoint(tiny_ckpt, task_file, align_file, tmp_path):
    """--dtype bf16 trains on a bf16 copy of the base; --merge adds ΔW to the checkpoint's own fp32 W0 and writes
    fp32 (it rounded W0 + ΔW to bf16, an error of ~0.4% of W0 in every merged weight, most of a small ΔW)."""
    out = tmp_path / "o"
    run(tiny_ckpt, task_file, align_file, out, "--steps", "3", "--method", "lora", "--dtype", "bf16", "--merge")
    W0, merged, ad = load_file(str(tiny_ckpt / "model.safetensors")), load_file(str(out / "merged" / "model.safetensors")), \
        adapter(out)
    assert json.loads((out / "merged" / "config.json").read_text())["torch_dtype"] == "float32"
    s = 16 / 8  # LoRAConfig's defaults: alpha 16, r 8
    for key in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.v_proj.weight"):
        m = key.removesuffix(".weight")
        dW = s * ad[f"base_model.model.{m}.lora_B.weight"] @ ad[f"base_model.model.{m}.lora_A.weight"]
        assert dW.abs().max() > 0 and merged[key].dtype == torch.float32
        torch.testing.assert_close(merged[key], W0[key] + dW, rtol=0, atol=1e-6)
    assert torch.equal(merged["model.layers.0.mlp.up_proj.weight"], W0["model.layers.0.mlp.up_proj.weight"])


def test_two_processes_equal_one_with_the_same_global_batch(tiny_ckpt, task_file, align_file, tmp_path):
    common = ["--ckpt", str(tiny_ckpt), "--task", str(task_file), "--align", str(align_file), "--eval-size", "8",
              "--max-len", "64", "--steps", "3", "--lr", "1e-2", "--warmup", "1", "--k", "4", "--n-align", "8",
              "--fisher-batch", "2", "--batch-size", "2", "--eval-every", "0", "--device", "cpu",
              "--fisher", "empirical"]  # the true Fisher samples labels: each process draws its own
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    one = subprocess.run([sys.executable, str(ROOT / "train.py"), *common, "--grad-accum", "2", "--out", str(tmp_path / "one")],
                         env=env, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29731",
                          str(ROOT / "train.py"), *common, "--grad-accum", "1", "--out", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = adapter(tmp_path / "one"), adapter(tmp_path / "two")
    for k in a:
        assert (a[k] - b[k]).abs().max() < 1e-5, k


# ----------------------------------------------------------------------------- failures

def test_existing_output_directory_is_refused(tiny_ckpt, task_file, align_file, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(SystemExit):
        run(tiny_ckpt, task_file, align_file, out, "--steps", "1")
    assert (out / "precious.txt").read_text() == "keep me" and len(list(out.iterdir())) == 1


def test_a_run_that_stopped_before_its_first_checkpoint_can_be_rerun_in_its_out(tiny_ckpt, task_file, align_file,
                                                                                  tmp_path, monkeypatch, capsys):
    """A run that fails at step 0 leaves only its Fisher cache in --out: the same command, fixed, runs there and
    reuses the cache; anything else in --out still refuses it."""
    real = train.batch_loss_sum
    monkeypatch.setattr(train, "batch_loss_sum", lambda *args: real(*args) * float("nan"))
    with pytest.raises(SystemExit):
        run(tiny_ckpt, task_file, align_file, tmp_path / "o", "--steps", "2")
    cache = list((tmp_path / "o").iterdir())
    assert len(cache) == 1 and train.is_fisher_cache(cache[0].name), cache
    monkeypatch.setattr(train, "batch_loss_sum", real)
    monkeypatch.setattr(train, "estimate_fisher", lambda *a, **kw: pytest.fail("the cached Fisher was not reused"))
    capsys.readouterr()
    run(tiny_ckpt, task_file, align_file, tmp_path / "o", "--steps", "2")
    assert (tmp_path / "o" / "adapter" / "adapter_model.safetensors").is_file()
    (tmp_path / "p").mkdir()
    for name in (cache[0].name, "fisher-alignguard-notahexkey00000.safetensors"):
        (tmp_path / "p" / name).write_bytes(b"mine")
    with pytest.raises(SystemExit):
        run(tiny_ckpt, task_file, align_file, tmp_path / "p", "--steps", "2")
    assert "holds fisher-alignguard-notahexkey00000.safetensors; choose another --out" in capsys.readouterr().err
    assert all(f.read_bytes() == b"mine" for f in (tmp_path / "p").iterdir())


def test_a_min_lr_above_lr_is_run_with_a_note(tiny_ckpt, task_file, align_file, tmp_path, capsys):
    """--lr 1e-5 (full fine-tuning's kind of rate) under the default --min-lr 2e-5 runs, with a note."""
    run(tiny_ckpt, task_file, align_file, tmp_path / "o", "--steps", "1", "--method", "lora", "--lr", "1e-5")
    assert "note: --min-lr 2e-05 is above --lr 1e-05" in capsys.readouterr().err


def test_written_files_get_the_umask_mode(tiny_ckpt, task_file, align_file, tmp_path, capsys):
    """safetensors' save_file and mkstemp make private (0600) files: the adapter, the Fisher cache, the
    checkpoint and merged/ get the mode a new file gets under the umask instead. (A warmup of 2 steps in a run
    of 1 gets a note.)"""
    umask = os.umask(0o022)
    try:
        run(tiny_ckpt, task_file, align_file, tmp_path / "o", "--steps", "1", "--merge")
    finally:
        os.umask(umask)
    files = [f for f in (tmp_path / "o").rglob("*") if f.is_file()]
    assert any(f.suffix == ".safetensors" for f in files) and len(files) > 8
    modes = {str(f.relative_to(tmp_path / "o")): oct(f.stat().st_mode & 0o777) for f in files}
    assert set(modes.values()) == {"0o644"}, modes
    assert "note: --warmup 2 is longer than the run's 1 step: the learning rate never reaches --lr 0.01" in capsys.readouterr().err


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("weight_grad", [False, True])
def test_lm_head_loss_equals_autograd_through_the_logits(dtype, tol, weight_grad):
    """train.lm_head_loss_sum (chunks of 3 rows over 10, gradients formed in the forward) against
    token_loss_sum(lm_head(h)) differentiated by autograd: the loss and the gradients of h and of lm_head's
    weight (trained in --method full), under a loss scaled afterwards as normalised_loss does."""
    gen = torch.Generator().manual_seed(0)
    lm_head = torch.nn.Linear(16, 40, bias=False).requires_grad_(weight_grad)
    h0, y = torch.randn(10, 16, generator=gen), torch.randint(0, 40, (10,), generator=gen)
    out = {}
    for name, fn in {"ours": lambda h: train.lm_head_loss_sum(lm_head, h, y, chunk=3 * 40),
                     "autograd": lambda h: train.token_loss_sum(lm_head(h)[None], y[None])}.items():
        h, lm_head.weight.grad = h0.clone().requires_grad_(), None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss = fn(h)
        assert (type(loss.grad_fn).__name__ == "LMHeadLossBackward") == (name == "ours")  # no silent fallback
        (loss / 7).backward()
        out[name] = [loss.detach(), h.grad] + ([lm_head.weight.grad] if weight_grad else [])
    for got, ref in zip(out["ours"], out["autograd"]):
        assert (got - ref).abs().max() <= tol * ref.abs().max()
    h = torch.randn(5, 16, dtype=torch.float64, generator=gen, requires_grad=True)
    W = torch.randn(40, 16, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(lambda h, W: train.LMHeadLoss.apply(h, W, y[:5], 2), (h, W))


def test_lm_head_loss_keeps_no_logits():
    """What autograd keeps for backward of lm_head_loss_sum holds no (N, V) tensor: the logits of a chunk die
    with it. Through the logits, F.cross_entropy keeps the (N, V) log-probabilities."""
    lm_head = torch.nn.Linear(16, 400, bias=False).requires_grad_(False)
    h, y = torch.randn(50, 16, requires_grad=True), torch.randint(0, 400, (50,))
    for fn, most in ((lambda: train.lm_head_loss_sum(lm_head, h, y, chunk=8 * 400), 50 * 16),
                     (lambda: train.token_loss_sum(lm_head(h)[None], y[None]), 50 * 400)):
        kept = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t.numel()) or t, lambda t: t):
            fn()
        assert max(kept) == most, kept


def test_activation_checkpointing_gives_the_same_gradients_and_saves_less(tiny_ckpt, task_file):
    """--grad-checkpoint: every LoRA gradient bit-identical (dropout replays its masks in the recompute), and the
    bytes autograd keeps for backward, counted with saved_tensors_hooks, less than half."""
    tok = load_tokenizer(tiny_ckpt)
    b = collate([encode_example(tok, p, r, 64)[:2] for p, r in read_task(task_file)[:8]], tok.pad_id)
    grads, saved = {}, {}
    for recompute in (False, True):
        model = load_model(tiny_ckpt)
        torch.manual_seed(1)
        add_lora(model, LoRAConfig(r=4, dropout=0.1, targets="all-linear"))
        for m in lora_modules(model).values():
            torch.nn.init.normal_(m.lora_B.weight, std=0.1)  # a non-zero update, so every path carries gradient
        model.train()
        model.gradient_checkpointing = recompute
        kept = []

        def pack(t):
            kept.append(t.numel() * t.element_size())
            return t

        torch.manual_seed(2)  # the dropout masks
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = train.batch_loss_sum(model, b["input_ids"], b["labels"])
        loss.backward()
        grads[recompute] = [p.grad for p in lora_parameters(model)]
        saved[recompute] = sum(kept)
    assert all(torch.equal(g0, g1) for g0, g1 in zip(grads[False], grads[True]))
    assert saved[True] < 0.5 * saved[False], saved


def test_compiled_blocks_give_the_loss_and_gradients_of_eager(tiny_ckpt, task_file, monkeypatch, new_graphs):
    """--compile: the training forward's blocks through model.compiled_block, alone and under --grad-checkpoint,
    give eager's loss and LoRA gradients (to fp32 rounding: inductor fuses and reorders); evaluation and
    generation do not go through it."""
    import model as model_py
    calls = []
    compiled = model_py.compiled_block()
    monkeypatch.setattr(model_py, "compiled_block", lambda: lambda *a: calls.append(1) or compiled(*a))
    tok = load_tokenizer(tiny_ckpt)
    b = collate([encode_example(tok, p, r, 64)[:2] for p, r in read_task(task_file)[:8]], tok.pad_id)
    results = {}
    for compile_blocks, recompute in ((False, False), (True, False), (True, True)):
        model = load_model(tiny_ckpt)
        torch.manual_seed(1)
        add_lora(model, LoRAConfig(r=4, targets="all-linear"))
        for m in lora_modules(model).values():
            torch.nn.init.normal_(m.lora_B.weight, std=0.1)  # a non-zero update, so every path carries gradient
        model.train()
        model.compile_blocks, model.gradient_checkpointing = compile_blocks, recompute
        loss = train.batch_loss_sum(model, b["input_ids"], b["labels"])
        loss.backward()
        results[compile_blocks, recompute] = loss.detach(), [p.grad for p in lora_parameters(model)]
        n = len(calls)
        model.eval()
        with torch.no_grad():
            model(b["input_ids"])
        model_py.generate(model, [[1, 2, 3]], max_new_tokens=2, eos_ids=None)
        assert len(calls) == n  # evaluation and generation stay eager
    assert len(calls) == 3 * model.config.num_hidden_layers  # every block, and again in the checkpointed backward
    # compiled, not run eagerly by a fallback: the first layer's graph (its input needs no gradient) and the rest's
    assert new_graphs() == 2
    loss0, grads0 = results[False, False]
    for key in ((True, False), (True, True)):
        loss, grads = results[key]
        torch.testing.assert_close(loss, loss0, rtol=1e-5, atol=0)
        for g, g0 in zip(grads, grads0):
            torch.testing.assert_close(g, g0, rtol=1e-4, atol=1e-6 * float(g0.abs().max()))


def test_fisher_from_labelled_logits_equals_the_full_forward(tiny_ckpt, align_file):
    """train.labelled_logits (lm_head at the response tokens only) gives the K-FAC factors, the same samples
    of the true Fisher and the diagonal Fisher of the default forward, whose (B, T, V) logits are indexed."""
    tok = load_tokenizer(tiny_ckpt)
    model = load_model(tiny_ckpt)
    b = collate([encode_example(tok, p, r, 64)[:2] for p, r in read_task(align_file)], tok.pad_id)
    targets = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj")  # shared inputs: q, k, v; gate, up
    full, fast = ({n: f for n, f in kfac_factors(model, [b], kind="true", targets=targets, forward=fwd,
                                                 generator=torch.Generator().manual_seed(0)).items()}
                  for fwd in (None, train.labelled_logits))
    assert full.keys() == fast.keys()
    for n in full:
        assert full[n][2] == fast[n][2] == int((b["labels"] != -100).sum())
        for a, c in zip(full[n][:2], fast[n][:2]):
            torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-9)
    for suffix in ("k_proj", "v_proj", "up_proj"):  # Ā of a module that shares its input, hooked alone: no sharing
        alone = kfac_factors(model, [b], kind="empirical", targets=(suffix,))
        for n, (A_bar, _, _) in alone.items():
            torch.testing.assert_close(fast[n][0], A_bar, rtol=1e-12, atol=0)
    d_full, d_fast = (diag_fisher(model, [b], targets=targets, forward=fwd) for fwd in (None, train.labelled_logits))
    for n in d_full:
        torch.testing.assert_close(d_full[n], d_fast[n], rtol=1e-5, atol=1e-12)


def test_bad_input_is_a_clear_error_and_leaves_no_output(tiny_ckpt, task_file, align_file, tmp_path, capsys):
    """A missing tokenizer and a malformed task file stop the CLI with one line naming the file (no traceback),
    before anything is written: --out is not even created."""
    no_tok = tmp_path / "no_tok"
    no_tok.mkdir()
    for name in ("model.safetensors", "config.json"):
        shutil.copy(tiny_ckpt / name, no_tok / name)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"sentence": "fine", "label": 1}\n{"sentence": "odd", "label": 3}\n')
    for ckpt, task, expect in ((no_tok, task_file, f"{no_tok / 'tokenizer.json'} not found"),
                               (tiny_ckpt, bad, f"{bad}, line 2, field 'label'")):
        out = tmp_path / f"out-{ckpt.name}-{task.stem}"
        with pytest.raises(SystemExit):
            run(ckpt, task, align_file, out, "--steps", "1")
        assert expect in capsys.readouterr().err
        assert not out.exists()


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_ckpt, task_file, align_file, tmp_path,
                                                                   monkeypatch, capsys):
    calls = {"n": 0}
    real = train.batch_loss_sum

    def poisoned(model, input_ids, labels):  # finite for the first 4 steps, then NaN
        calls["n"] += 1
        loss = real(model, input_ids, labels)
        return loss * float("nan") if calls["n"] > 4 else loss

    monkeypatch.setattr(train, "batch_loss_sum", poisoned)
    out = tmp_path / "o"
    with pytest.raises(SystemExit):
        run(tiny_ckpt, task_file, align_file, out, "--steps", "8", "--ckpt-every", "2", "--method", "lora")
    err = capsys.readouterr().err
    assert "step 4: non-finite" in err and f"the last checkpoint, of step 4, is in {out / 'checkpoint'}" in err, err
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["step"] == 4
    assert all(torch.isfinite(v).all() for v in load_file(str(out / "checkpoint" / "trainable.safetensors")).values())
    assert not (out / "adapter").exists()


def test_disk_error_while_saving_keeps_the_previous_checkpoint(tiny_ckpt, task_file, align_file, tmp_path, monkeypatch,
                                                              capsys):
    out = tmp_path / "o"
    real, calls = train.save_file, {"n": 0}

    def failing(tensors, path, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint dies half-way: disk full
            Path(path).write_bytes(b"partial")
            raise OSError(28, "No space left on device")
        return real(tensors, path, *a, **kw)

    monkeypatch.setattr(train, "save_file", failing)
    with pytest.raises(SystemExit):  # the CLI prints "error: [Errno 28] No space left on device", no traceback
        run(tiny_ckpt, task_file, align_file, out, "--steps", "6", "--ckpt-every", "2", "--method", "lora")
    assert "error: [Errno 28] No space left on device" in capsys.readouterr().err
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["step"] == 2
    load_file(str(out / "checkpoint" / "trainable.safetensors"))  # intact
    assert not (out / "checkpoint.tmp").exists()


@pytest.mark.parametrize("method, estimator", [("alignguard", "estimate_fisher"), ("ewc", "diag_fisher")])
def test_fisher_is_cached_and_reused(tiny_ckpt, task_file, align_file, tmp_path, monkeypatch, capsys, method, estimator):
    cache = tmp_path / "cache"
    run(tiny_ckpt, task_file, align_file, tmp_path / "a", "--steps", "2", "--fisher-cache", str(cache), "--method", method)
    files = list(cache.glob(f"fisher-{method}-*.safetensors"))
    assert len(files) == 1

    def no_estimate(*a, **kw):
        raise AssertionError("the cached Fisher should have been reused")

    monkeypatch.setattr(train, estimator, no_estimate)
    run(tiny_ckpt, task_file, align_file, tmp_path / "b", "--steps", "2", "--fisher-cache", str(cache), "--method", method)
    with pytest.raises(AssertionError, match="reused"):  # other settings, other key: estimated again
        run(tiny_ckpt, task_file, align_file, tmp_path / "c", "--steps", "2", "--fisher-cache", str(cache), "--method",
            method, "--n-align", "6")
    # a cache file cut short (a kill, a full disk) is named, not a traceback from safetensors
    files[0].write_bytes(files[0].read_bytes()[:64])
    with pytest.raises(SystemExit):
        run(tiny_ckpt, task_file, align_file, tmp_path / "d", "--steps", "2", "--fisher-cache", str(cache), "--method", method)
    assert f"error: {files[0]}: not a readable safetensors file" in capsys.readouterr().err


def test_batch_loss_sum_equals_the_loss_over_all_logits(tiny_ckpt, task_file):
    tok = load_tokenizer(tiny_ckpt)
    b = collate([encode_example(tok, p, r, 64)[:2] for p, r in read_task(task_file)[:5]], tok.pad_id)
    model = load_model(tiny_ckpt, dtype=torch.float64)
    full = train.token_loss_sum(model(b["input_ids"]), b["labels"])
    assert train.batch_loss_sum(model, b["input_ids"], b["labels"]).item() == pytest.approx(full.item(), rel=1e-6)


def test_non_finite_loss_stops_an_fp16_run_too(tiny_ckpt, task_file, align_file, tmp_path, monkeypatch, capsys):
    """The loss scaler skips steps whose gradients overflow; a non-finite loss itself still stops."""
    real = train.batch_loss_sum
    monkeypatch.setattr(train, "batch_loss_sum", lambda *args: real(*args) * float("nan"))
    with pytest.raises(SystemExit):
        run(tiny_ckpt, task_file, align_file, tmp_path / "o", "--steps", "3", "--dtype", "fp16", "--method", "lora")
    assert not (tmp_path / "o" / "adapter").exists()
    assert "step 0: non-finite" in (err := capsys.readouterr().err) and "no checkpoint was written" in err, err


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="--log-every must be at least 1"):
        train.TrainConfig(log_every=0)
    with pytest.raises(ValueError, match="--method must be one of"):
        train.TrainConfig(method="qlora")

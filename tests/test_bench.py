"""tests/bench.py and tests/cuda_check.py run as written (issue 7's benchmark, issue 4's GPU check), on bench's
`tiny` check shape: every measurement, the report and the JSON, in seconds. Their numbers mean nothing at
that size; what is checked is that the scripts run and that both stacks compute the same thing."""

import json
import re

import pytest
import torch

import bench
import cuda_check


@pytest.fixture
def in_process(monkeypatch):
    """bench's workers run in this process instead of one subprocess each (seconds of imports apiece); results
    go through JSON as they would from a worker. The memory worker's environment (MALLOC_MMAP_THRESHOLD_) is
    dropped, so its peaks are this process's own: they are only checked to be measured at all."""
    def run_worker(task, env=None):
        return json.loads(json.dumps(bench.WORKERS[task["kind"]](task)))
    monkeypatch.setattr(bench, "run_worker", run_worker)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers deprecation chatter, as bench workers silence it
def test_bench_runs_every_measurement(in_process, capsys, tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    out = tmp_path / "bench.json"
    # --threads as now: bench.main sets it for the whole process
    bench.main(["--shape", "tiny", "--quick", "--profile", "--json", str(out),
                "--threads", str(torch.get_num_threads())])
    text = capsys.readouterr().out
    assert text.count("Self CPU time total") == 2  # --profile: torch.profiler's table of our step, per dtype
    for dtype in ("fp32", "bf16"):
        assert f"## tiny (0.1M params), {dtype}, cpu" in text
    rows = [line.strip() for line in text.splitlines() if line.startswith("  ")]
    names = ("LoRA step qkvo: tokens/s", "LoRA step qkvo: peak MiB", "LoRA step all-linear: tokens/s",
             "with --grad-checkpoint: tokens/s", "AlignGuard step vs plain, qkvo: ms",
             "AlignGuard step vs plain, all-linear: ms", "estimate_fisher(1 batch) vs step: s",
             "K-FAC factors (1 batch) vs step: s", "greedy generation: tokens/s")
    for name in names:
        assert sum(r.startswith(name) for r in rows) == 2, name  # once per dtype
    assert not any("failed" in r or "!!" in r for r in rows)
    # the same weights give the same logits and the same greedy tokens in both stacks
    assert sum(r.startswith("same tokens / max logit diff") and r.split()[6] == "yes" for r in rows) == 2

    runs = json.loads(out.read_text())["runs"]
    assert [r["dtype"] for r in runs] == ["fp32", "bf16"]
    for run in runs:
        cells = run["cells"]
        assert set(cells) == {"ours/qkvo", "theirs/qkvo", "pair/qkvo", "ours/all-linear", "theirs/all-linear",
                              "pair/all-linear", "ours-ckpt/all-linear"}
        for key in ("ours/qkvo", "theirs/qkvo"):
            assert cells[key]["peak_bytes"] > 0 and len(cells[key]["step_s"]) == 3
        assert cells["ours/qkvo"]["n_trainable"] == cells["theirs/qkvo"]["n_trainable"]
        # the AlignGuard step on both target sets (q,k,v,o is the default), the Fisher on all-linear only
        assert all(len(cells[f"ours/{t}"]["ag_step_s"]) == 3 for t in ("qkvo", "all-linear"))
        assert "kfac_s" in cells["ours/all-linear"] and "kfac_s" not in cells["ours/qkvo"]
        assert cells["ours/all-linear"]["n_loss_tokens"] == cells["theirs/all-linear"]["n_loss_tokens"] > 0
        gen = run["generate"]
        assert gen["tokens_equal"] and gen["lengths_ours"] == gen["lengths_theirs"] == [6, 6]  # gen_new, eos off
        assert gen["logit_max_diff"] < (1e-5 if run["dtype"] == "fp32" else 1e-1)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_bench_compile_rows(in_process, capsys, tmp_path, new_graphs):
    """--compile (fp32 only: a bf16 compile would add a minute): our step with compiled blocks, against our
    eager step and theirs, and its peak memory, per target set."""
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    out = tmp_path / "bench.json"
    bench.main(["--shape", "tiny", "--quick", "--dtype", "fp32", "--compile", "--json", str(out),
                "--threads", str(torch.get_num_threads())])
    # compiled, not run eagerly by a fallback (which would print the same rows): two graphs per target set
    # (model.compiled_block), which the memory worker's models reuse
    assert new_graphs() == 4
    rows = [line.strip() for line in capsys.readouterr().out.splitlines() if line.startswith("  ")]
    names = [re.split(r"\s{2,}", r)[0] for r in rows]
    for name in ("with --compile: tokens/s", "with --compile: tokens/s vs our eager step",
                 "with --compile: first step (compiling): s", "with --compile: peak MiB"):
        assert names.count(name) == 2, name  # once per target set
    assert not any("failed" in r or "!!" in r for r in rows)
    cells = json.loads(out.read_text())["runs"][0]["cells"]
    for t in ("qkvo", "all-linear"):  # the compiling step, then ours compiled, ours eager and theirs interleaved
        c = cells[f"compiled/{t}"]
        assert len(c["compile_s"]) == 1 and all(len(c[k]) == 3 for k in ("eager_s", "compiled_s", "theirs_s"))
        m = cells[f"ours-compiled/{t}"]  # its measured model reuses the graphs the throwaway one compiled
        assert m["peak_bytes"] > 0 and m["graphs_in_peak"] == 0


def test_bench_worker_subprocess():
    """One real worker: the JSON task on its command line, the RESULT line back."""
    pytest.importorskip("transformers")
    task = {"kind": "generate", "shape": "tiny", "dtype": "fp32", "device": "cpu", "threads": 1, "seed": 0,
            "reps": 1, "gen_new": 4, "quiet_hf": True}
    result = bench.run_worker(task)
    assert result is not None and result["tokens_equal"] and result["new_tokens"] == 2 * 4


def test_bench_worker_failure_is_reported(capsys):
    assert bench.run_worker({"kind": "no-such-measurement", "dtype": "fp32", "threads": 1}) is None
    err = capsys.readouterr().err
    assert "no-such-measurement" in err and "KeyError" in err  # the worker's own traceback is passed on


def test_shape_selection():
    assert bench.selected_shapes("all", "cpu") == ["small", "smollm"]  # never the tiny check shape
    assert bench.selected_shapes("all", "cuda") == ["small", "smollm", "1b"]
    assert bench.selected_shapes("tiny", "cpu") == ["tiny"]
    with pytest.raises(SystemExit, match="cuda only"):
        bench.selected_shapes("1b", "cpu")


def test_native_bf16_and_the_matmul_peak_size(monkeypatch):
    """The bf16 note's test reads the flags line; the CPU matmul peak stops growing its product once one takes
    over a second (an emulated fp16 4096 product took minutes), else goes up to 4096."""
    assert bench.native_bf16("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16 amx_tile\n") is True
    assert bench.native_bf16("flags\t\t: fpu avx512f avx512_vnni\n") is False
    assert bench.native_bf16("processor\t: 0\n") is None
    sizes = []
    monkeypatch.setattr(torch, "mm", lambda a, b: sizes.append(a.shape[0]))
    for slow, want in ((2.0, [512]), (0.5, [512, 1024, 2048, 4096])):
        sizes.clear()
        monkeypatch.setattr(bench, "timed", lambda fn, device: fn() or slow)
        assert bench.matmul_peak(torch.float16, "cpu", reps=2) == 2 * want[-1] ** 3 / slow
        assert sorted(set(sizes)) == want


def test_cuda_check_runs_on_cpu(tmp_path, capsys):
    code = cuda_check.main(["--device", "cpu", "--shape", "tiny", "--steps", "3", "--dtypes", "bf16", "--batch-size", "2",
                            "--max-len", "32", "--skip", "1", "--out", str(tmp_path)])
    text = capsys.readouterr().out
    lines = {line.split()[0]: line for line in text.splitlines() if line.startswith(("fp32 ", "bf16 "))}
    assert set(lines) == {"fp32", "bf16"} and "reference" in lines["fp32"]
    assert code == 0 and " ok " in lines["bf16"]  # three steps of a tiny model: bf16 tracks fp32 to well under 2%
    assert len(cuda_check.read_metrics(tmp_path / "bf16")) == 3


@pytest.mark.parametrize("targets", ["qkvo", "all-linear"])
def test_train_flops_is_what_the_flop_counter_sees(targets):
    """train_flops against torch's FlopCounterMode over one of our LoRA steps (tiny shape, fp32): the counted
    matmul FLOPs are exactly train_flops less what the counter does not see or the step does not run, both
    written out here: attention (SDPA's CPU kernel has no FLOP formula, aten.mm alone is counted) and layer 0's
    input gradients (its input, the frozen embedding's output, needs none: q, k, v and their LoRA A)."""
    from torch.utils.flop_counter import FlopCounterMode
    shape = bench.SHAPES["tiny"]
    cfg, B, T, r = shape.model, shape.batch, shape.seq, 8
    task = {"shape": "tiny", "dtype": "fp32", "device": "cpu", "seed": 0, "batch": B, "seq": T, "targets": targets}
    _, step, _, n_loss, _ = bench.build_step(task, "ours")
    step()
    with FlopCounterMode(display=False) as counter:
        step()
    assert set(counter.get_flop_counts()["Global"]) == {torch.ops.aten.mm}
    attention = 3 * cfg.num_hidden_layers * B * 4 * T * T * cfg.num_attention_heads * cfg.head_dim
    C, qkv = cfg.hidden_size, (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim
    layer0_dx = 2 * B * T * (C * qkv + 3 * r * C)
    want = bench.train_flops(cfg, bench.TARGETS[targets], r, B, T, n_loss)
    assert n_loss < B * T and counter.get_total_flops() == want - attention - layer0_dx


def test_run_worker_stops_a_worker_at_its_timeout(capsys):
    task = {"kind": "generate", "shape": "tiny", "dtype": "fp32", "device": "cpu", "timeout": 0.05}
    assert bench.run_worker(task) is None
    assert "generate fp32: stopped after --worker-timeout 0.05 s" in capsys.readouterr().err

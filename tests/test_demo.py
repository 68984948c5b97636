"""The default pipeline (`python train.py` with no arguments) on the shipped demo model, shortened:
a few steps per method and a small DRIFTCHECK subset. The numbers themselves are the demo's, not
the test's: it checks that every stage runs and that the report holds what the README promises."""

import json
from pathlib import Path

import train

ROOT = Path(__file__).resolve().parents[1]


def test_default_pipeline_smoke(tmp_path, monkeypatch):
    assert (ROOT / "data" / "demo" / "model.safetensors").is_file(), "the demo model must ship in data/demo"
    monkeypatch.chdir(ROOT)  # the demo's paths are relative to the repository, as for a user
    report = train.demo(out=str(tmp_path / "demo"), limit=24, steps=3)
    names = [m["name"] for m in report["models"]]
    assert names == ["base", "lora", "alignguard"]
    for m in report["models"]:
        dc = m["driftcheck"]["metrics"]
        assert dc["RR_u"]["n"] == 12 and dc["RR_s"]["n"] == 12, dc
        assert 0 <= m["task"]["accuracy"]["rate"] <= 1
        assert m["heldout"]["loss"] > 0
    for m in report["models"][1:]:
        assert m["align_kl"]["kl"] >= 0 and "drift" in m["vs_base"]
    for method in ("lora", "alignguard"):
        assert (tmp_path / "demo" / method / "adapter" / "adapter_model.safetensors").is_file()
        assert json.loads((tmp_path / "demo" / method / "summary.json").read_text())["steps"] == 3
    text = (tmp_path / "demo" / "report.md").read_text()
    assert "alignguard" in text and "lora" in text
    assert json.loads((tmp_path / "demo" / "report.json").read_text())["reference_lora"] == "lora"

"""workflow/bench/bench_gpu.py --quick: the GPU benchmark's CPU smoke test (tiny presets, a few steps, ~30 s)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROWS = ("CellFlow", "scGPT", "PRiMeFlow U-Net", "scLDM DiT")
NUMBER = r"[0-9][0-9,]*\.?[0-9]*(?:e[-+]?\d+)?"


def test_quick_mode_prints_four_rows_with_numbers_and_ratios(tmp_path):
    out = tmp_path / "bench_gpu.json"
    proc = subprocess.run([sys.executable, str(ROOT / "workflow" / "bench" / "bench_gpu.py"), "--quick", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    res = json.loads(out.read_text())
    by_model = {r["model"]: r for r in res["results"]}
    assert list(by_model) == list(ROWS)
    for model in ROWS:
        row = next(line for line in lines if line.startswith(model + " "))
        r = by_model[model]
        assert r["measured"] > 0 and r["precision"], r
        assert re.search(rf"{NUMBER} (ms/it|cells/s|ms/step)", row), row
        if r["card"] is None:  # PRiMeFlow: the paper gives no training time
            assert model == "PRiMeFlow U-Net" and row.split()[-2:] == ["n/a", "n/a"], row
        else:
            assert re.search(rf"{NUMBER} (ms/it|cells/s|ms/step)\s+{NUMBER}x$", row), row
            assert abs(r["ratio"] - (r["card"] / r["measured"] if r["unit"].startswith("ms") else r["measured"] / r["card"])) < 1e-9
    # the cards' reference figures: 0.7 h / 200,000 it and 5,400,630 cells / 393.6 min
    assert round(res["card_figures"]["cellflow_ms_per_it"], 1) == 12.6
    assert round(res["card_figures"]["scgpt_cells_per_s"]) == 229
    assert res["forbidden_imports"] == []  # snakemake / scanpy / cell_eval: not by the benchmark or the project's modules
    assert "ratios are NOT meaningful" in proc.stdout

"""tools/bench_specialize.py runs end to end in --quick mode: a few training steps, the package,
a dozen readings through a real agent and raw llama-cpp-python (it checks the bench's table and
figures are all there, not their values). Needs the [train] extra (torch)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(1500)  # about a minute on a quiet machine; 8 minutes seen at load 15
def test_quick_specialize_bench_prints_both_tables_and_writes_every_figure(
        tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "tools/bench_specialize.py", "--quick", "--json",
                           str(out), "--work", str(tmp_path / "work")],
                          cwd=REPO, capture_output=True, text=True, timeout=1400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("Load average at the end: ")
    lines = lines[2:]
    targets = lines[:lines.index("")]
    assert targets[0] == "| measure | measured | target | ratio |"
    assert [row.split(" | ")[0] for row in targets[2:]] == [
        "| wall time, rule to signed package", "| CPU time, rule to signed package",
        "| of which training, wall (CPU)", "| q8_0 accuracy, 12 held-out readings",
        "| q8_0 schema-valid", "| q8_0 size",
        "| latency through the agent, p50 (12 readings)", "| latency through the agent, p95",
        "| of which (p50 each): to the agent / model / commit, queue and uplink",
        "| raw llama-cpp-python, p50 / p95", "| accuracy through the agent / raw"]
    files = lines[lines.index("") + 1:]
    assert [row.split(":")[0] for row in files[2:6]] == ["| f32", "| f16", "| q8_0", "| q4_0"]
    results = json.loads(out.read_text())
    figures = [results["specialize"]["wall_s"], results["specialize"]["cpu_s"],
               results["agent"]["p50_ms"], results["agent"]["p95_ms"],
               results["raw"]["p50_ms"], results["raw"]["p95_ms"]]
    assert all(isinstance(f, float) and f > 0 for f in figures), figures
    assert (results["agent"]["readings"], results["raw"]["readings"]) == (12, 12)
    assert results["served"] == "temperature-student-q8_0.gguf"
    assert all(0 <= results[k]["accuracy"] <= 1 for k in ("agent", "raw"))
    assert (tmp_path / "work" / "student" / "package" / "manifest.json").exists()

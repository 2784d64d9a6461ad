"""The benchmark suite runs end to end in --quick mode (it checks the suite, not the figures)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_quick_benchmark_prints_the_table_and_writes_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "tools/bench.py", "--quick", "--json", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| inference results/s |" in proc.stdout
    results = json.loads(out.read_text())
    figures = [
        results["inference"]["agent"]["results_per_s"],
        results["inference"]["raw"]["results_per_s"],
        results["ingest"]["agent_per_s"], results["ingest"]["raw_per_s"],
        results["uplink"]["agent_per_s"], results["uplink"]["raw_per_s"],
        results["footprint"]["agent_rss_mib"], results["footprint"]["start_to_ready_s"],
    ]
    assert all(isinstance(f, float) and f > 0 for f in figures), figures

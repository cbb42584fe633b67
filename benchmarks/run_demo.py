"""The README's main job, timed and recorded: ``lgd-fast demo`` with its defaults in a fresh folder.

Writes benchmarks/results/demo_cpu.json: the demo's metrics.json (accuracy, reversed control, speed figures,
per-step seconds), the wall-clock seconds of the whole command, the targets (issue: at most 10 minutes on two
CPU cores, val top-1 >= 90%, reversed top-1 <= 10%) with pass/fail, and the machine.

    python benchmarks/run_demo.py
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as h  # noqa: E402

from lgd_fast.bench import write_json  # noqa: E402

TARGETS = {"total_seconds_max": 600.0, "val_top1_min": 0.9, "reversed_top1_max": 0.1}


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "lgd_fast", "demo", "--out", str(Path(tmp) / "demo"), "--no-progress"]
        start = time.perf_counter()
        subprocess.run(command, check=True)
        seconds = time.perf_counter() - start
        metrics = json.loads((Path(tmp) / "demo" / "metrics.json").read_text())
    checks = {
        "total_seconds": {"measured": seconds, "target": f"<= {TARGETS['total_seconds_max']}",
                          "met": seconds <= TARGETS["total_seconds_max"]},
        "val_top1": {"measured": metrics["val_top1"], "target": f">= {TARGETS['val_top1_min']}",
                     "met": metrics["val_top1"] >= TARGETS["val_top1_min"]},
        "reversed_top1": {"measured": metrics["reversed_top1"], "target": f"<= {TARGETS['reversed_top1_max']}",
                          "met": metrics["reversed_top1"] <= TARGETS["reversed_top1_max"]},
    }  # fmt: skip
    payload = {
        "benchmark": "demo",
        "command": "lgd-fast demo --out DIR --no-progress (fresh DIR: the dataset is built too)",
        "machine": h.machine_info(),
        "wall_seconds": seconds,
        "target_check": checks,
        "metrics": metrics,
    }
    print("wrote", write_json(h.RESULTS_DIR / "demo_cpu.json", payload))
    for name, check in checks.items():
        print(f"{name}: {check['measured']:.3f} (target {check['target']}) -> {'met' if check['met'] else 'NOT met'}")


if __name__ == "__main__":
    main()

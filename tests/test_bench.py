"""The benchmark script runs (tiny models, CPU); its numbers are never asserted (shared, noisy machines)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_step_time_table_prints_a_row_per_method_batch_and_optimizer():
    command = [sys.executable, str(ROOT / "bench" / "step_time.py"), "--sizes", "tiny", "--families", "sd1"]
    command += ["--methods", "textual_inversion,lora", "--batch", "1,2", "--steps", "4", "--optimizers", "adamw,lion"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line.split() for line in done.stdout.splitlines() if line.startswith(("textual_inversion", "lora"))]
    assert len(rows) == 8  # 2 methods x 2 batch sizes x 2 optimizers
    assert {row[6] for row in rows} == {"adamw", "lion"}

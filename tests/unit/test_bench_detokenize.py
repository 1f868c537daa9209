"""bench/detokenize.py: it runs, writes its JSON, and the incremental side is the cheaper one at length."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_detokenize_benchmark_prints_a_table_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "detok.json"
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "detokenize.py"), "--lengths", "32,400",
                             "--json", str(out)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "a few tokens per delta" in result.stdout
    runs = json.loads(out.read_text())["runs"]
    assert [r["tokens"] for r in runs] == [32, 400]
    assert all(r["whole_s"] > 0 and r["incremental_s"] > 0 for r in runs)
    assert runs[1]["ratio"] > 2  # O(n^2) against O(n) tokenizer work at 400 tokens (~9x on the 2-core machine)

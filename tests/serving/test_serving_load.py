"""The serving load check (bench/bench_serving_load.py) short: 8 clients x 4 requests on a tiny model with the real
tokenizer, a quarter hanging up mid-stream or mid-request; completed answers equal their answers alone, no slot
leaks, /health ok, memory flat. The long run (16 x 20 on SmolLM2) is in BENCHMARKS.md."""
import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_serving_load.py"


def test_a_crowd_with_hang_ups_leaves_no_slot_and_changes_no_answer(tiny_chat_dir, tmp_path):
    out = tmp_path / "load.json"
    proc = subprocess.run([sys.executable, str(BENCH), "--model", str(tiny_chat_dir), "--clients", "8",
                           "--requests", "4", "--tokens", "16", "--max-batch", "4", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    result = json.loads(out.read_text())
    assert result["answered"] == 24 and result["hung_up"] == 8 and result["cancelled_by_engine"] >= 1
    assert all(result["checks"].values()), result["checks"]

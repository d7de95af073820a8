"""Measure the peak RSS of a short CPU training run for tests/test_plan.py (run in a fresh process,
so the peak belongs to this run alone). Prints one JSON line: model, seq, batch, peak_gib."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SEQ, BATCH = 256, 4

work = Path(sys.argv[1])
model = work / "model"
subprocess.run([sys.executable, str(REPO / "bench" / "make_random_model.py"), str(model), "--shape", "cpu-32k"],
               check=True, capture_output=True)
out = subprocess.run([sys.executable, str(REPO / "bench" / "train.py"), "--worker", "hf", "--work", str(work),
                      "--model", str(model), "--seq-len", str(SEQ), "--steps", "3", "--warmup", "1",
                      "--batch-size", str(BATCH), "--r", "16"], check=True, capture_output=True, text=True).stdout
result = json.loads([line for line in out.splitlines() if line.startswith("RESULT ")][-1][len("RESULT "):])
print(json.dumps({"model": str(model), "seq": SEQ, "batch": BATCH, "peak_gib": result["memory_mb"] / 1024}))

"""benchmarks/gpu_proof.sh runs end to end: its CPU dry run on a tiny model (the commands a GPU machine runs)."""
import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_proof_dry_run(model_dirs, tmp_path):
    from conftest import DATA

    data = tmp_path / "data"
    data.mkdir()
    for name, source in (("train", "valid"), ("valid", "test"), ("test", "test")):
        (data / f"{name}.txt").write_text((DATA / "sotu" / f"{source}.txt").read_text()[:30_000])
    env = {**os.environ, "DRY_RUN": "1", "MODEL": str(model_dirs["llama"]), "DATA": str(data),
           "OUT": str(tmp_path / "out"), "RUNS": str(tmp_path / "runs")}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_proof.sh")], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads((tmp_path / "out" / "ast_budget.json").read_text())
    trained = [r for r in rows if r["test_ppl"] is not None]
    assert [r["method"] for r in trained] == ["naive", "fixed+kd", "ast-no-decay", "ast", "ast-slorb"]
    assert all({"method", "tokens", "test_ppl", "seconds"} <= set(r) and r["tokens"] > 0 for r in trained)
    assert (tmp_path / "out" / "ast_budget_curves.png").exists()
    assert json.loads((tmp_path / "out" / "bench.json").read_text())

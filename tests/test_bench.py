"""The benchmark scripts still run (tiny sizes) and report what they claim; no timing asserted."""
import os
import subprocess
import sys

from conftest import REPO


def bench(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    out = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_threshold_bench_checks_identity():
    out = bench("bench/bench_threshold.py", "--tiny")
    rows = [line.split() for line in out.splitlines() if line.strip().startswith(("50 ", "200 "))]
    assert [r[0] for r in rows] == ["50", "200"] and all(r[-1] == "True" for r in rows)


def test_train_bench_reports_every_ratio():
    out = bench("bench/bench_train.py", "--tiny")
    assert "project/bare" in out and "release/project" in out
    columnfc = next(line.split() for line in out.splitlines() if line.strip().startswith("columnfc"))
    assert len(columnfc) == 7 and float(columnfc[4]) > 0 and float(columnfc[6]) > 0
    assert "columnfc epoch scaling" in out


def test_pipeline_bench_times_every_python_step(tmp_path):
    script = tmp_path / "steps.sh"
    script.write_text('python -c "print(1)"\npython -c "import time; time.sleep(0.2)" --flag\n')
    out = bench("bench/bench_pipeline.py", "--script", str(script), "--args", "")
    steps = [line.split(None, 1) for line in out.splitlines()[3:] if line.strip()]
    assert [s[1].strip() for s in steps] == ['-c print(1)', '-c import time; time.sleep(0.2) --flag']
    assert float(steps[1][0]) >= 0.2

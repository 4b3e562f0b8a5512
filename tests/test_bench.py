"""The benchmark scripts still run (tiny sizes) and report what they claim; no timing asserted."""

import os
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow  # runs the scripts end to end


def bench(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    out = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_threshold_bench_checks_identity():
    out = bench("bench/bench_threshold.py", "--tiny")
    rows = [line.split() for line in out.splitlines() if line.strip().startswith(("50 ", "200 "))]
    assert [r[0] for r in rows] == ["50", "200"] and all(r[-1] == "True" for r in rows)


def test_bootstrap_bench_times_every_kind_and_checks_the_loop():
    out = bench("bench/bench_bootstrap.py", "--tiny")
    rows = [line.split() for line in out.splitlines() if line.strip().startswith("500 ")]
    assert [r[2] for r in rows] == ["balanced", "plain", "best_balanced", "paired"]
    assert "one resample at a time (300 samples, 40 resamples): True" in out


def test_loo_bench_times_every_step_and_checks_rmia():
    out = bench("bench/bench_loo.py", "--tiny")
    rows = [line.split() for line in out.splitlines() if line.strip().startswith("8 ")]
    steps = ["lira_online_loo", "rmia_loo", "audit_metrics", "audit_metrics", "decile_table"]
    assert [r[2] for r in rows] == steps and [r[1] for r in rows] == ["300"] * 5
    assert "rmia_loo == rmia_pairwise's quadratic count (target 0): True" in out


def test_train_bench_ratios_are_its_measured_times():
    """Each ratio column is the quotient of the two times it names, as printed (rounding aside), and the
    scaling table's us/row is seconds / rows."""
    out = bench("bench/bench_train.py", "--tiny")
    lines = out.splitlines()
    header = next(line.split() for line in lines if line.strip().startswith("model"))
    assert header == ["model", "rows", "project", "bare", "project/bare", "release-style", "release/project"]
    rows = [
        line.split() for line in lines if line.strip().startswith(("columnfc ", "resnet18 ")) and "scaling" not in line
    ]
    assert [(r[0], r[1]) for r in rows] == [("columnfc", "300"), ("columnfc", "60"), ("resnet18", "64")]
    for model, _n, project, bare, ratio, release, release_ratio in rows:
        assert quotient_fits(ratio, project, bare)
        assert (
            release == release_ratio == "-" if model == "resnet18" else quotient_fits(release_ratio, release, project)
        )
    start = lines.index(next(line for line in lines if "columnfc epoch scaling" in line))
    scaling = [line.split() for line in lines[start:] if line.strip()[:1].isdigit()]
    assert [r[0] for r in scaling] == ["100", "1000"]
    for n, seconds, per_row in scaling:
        assert quotient_fits(per_row, seconds, str(int(n) / 1e6))


def half_unit(text):
    """Half a unit in the last printed digit: how far the printed value may be from the true one."""
    return 0.5 * 10 ** -len(text.partition(".")[2])


def quotient_fits(printed, numerator, denominator):
    """Whether `printed` can be numerator / denominator for some true values behind the printed ones."""
    n, d, q = float(numerator), float(denominator), float(printed)
    dn, dd, dq = half_unit(numerator), half_unit(denominator), half_unit(printed)
    low = (n - dn) / (d + dd)
    high = (n + dn) / (d - dd) if d > dd else float("inf")
    return low - dq <= q <= high + dq


def test_pipeline_bench_times_every_python_step(tmp_path):
    script = tmp_path / "steps.sh"
    script.write_text('python -c "print(1)"\npython -c "import time; time.sleep(0.2)" --flag\n')
    out = bench("bench/bench_pipeline.py", "--script", str(script), "--args", "")
    steps = [line.split(None, 1) for line in out.splitlines()[3:] if line.strip()]
    assert [s[1].strip() for s in steps] == ["-c print(1)", "-c import time; time.sleep(0.2) --flag"]
    assert float(steps[1][0]) >= 0.2


def test_audit_bench_times_every_step_of_the_one_command():
    """The digits audit's command at toy size (3 models, the fewest, 2 epochs): every step is timed and the table
    has a row for the unpruned models, the four defenses and dp."""
    tiny = [
        "--canaries",
        "4",
        "--epochs",
        "2",
        "--prune_iter",
        "2",
        "--prune_epochs",
        "2",
        "--trials",
        "1",
        "--target_acc",
        "0",
    ]
    out = bench("bench/bench_audit.py", "--models", "3", "--", *tiny, "--tuning_models", "3", "--bootstrap", "20")
    steps = [line.split()[0] for line in out.split("Seconds per step\n")[1].split("\n\n")[0].splitlines()[1:]]
    assert steps[:4] == ["prepare", "pretrain.g0", "memscore", "attack.unpruned"] and steps[-1] == "summarize"
    assert "tune.dp" in steps and sum(s.startswith("prune.") for s in steps) == 5
    assert "Total wall time" in out
    rows = [line.split(" | ")[0] for line in out.splitlines() if line.startswith("| ") and "---" not in line]
    paired = rows.index("| defense minus Base (paired)")  # the second table: each row minus Base, paired
    assert [r.strip("| ").split(" (")[0] for r in rows[1:paired]] == [
        "unpruned",
        "base",
        "slide_re",
        "ml2",
        "slide_ml2",
        "dp",
    ]
    best = rows.index("| defense minus the best baseline (paired)")  # the third: minus dp, the only baseline
    assert [r.strip("| ").split(" (")[0] for r in rows[paired + 1 : best]] == [
        "unpruned",
        "slide_re",
        "ml2",
        "slide_ml2",
        "dp",
    ]
    assert [r.strip("| ").split(" (")[0] for r in rows[best + 1 :]] == [
        "unpruned",
        "base",
        "slide_re",
        "ml2",
        "slide_ml2",
    ]


def test_ensemble_bench_speedups_are_its_times_and_the_arms_agree():
    """Each speed-up is the quotient of the two times before it (wall, CPU), and on the tiny run (3 models, a
    few epochs) both arms choose the same epochs and end within float rounding of each other."""
    out = bench("bench/bench_ensemble.py", "--tiny", "--repeat", "1")
    rows = [line.split() for line in out.splitlines() if line.strip().startswith(("pretraining ", "base_pruning "))]
    assert [(r[0], r[1]) for r in rows] == [("pretraining", "3"), ("base_pruning", "3")]
    for _step, _models, one_at_a_time, ensemble, speedup, cpu_one, cpu_ensemble, cpu_speedup in rows:
        assert quotient_fits(speedup, one_at_a_time, ensemble)
        assert quotient_fits(cpu_speedup, cpu_one, cpu_ensemble)
    for step in ("pretraining", "base_pruning"):
        assert f"{step}: best epochs (every iteration's) equal for 3/3 models; weights within 1e-4 for 3/3" in out

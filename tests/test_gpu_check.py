"""bench/gpu_check.sh, the prepared GPU check: its CPU dry run runs every item a lent GPU would, and its table
names every registered defense and attack, so a mistake in it shows here, not on the GPU. (The GPU run takes every
defense in both semantics; the dry run, whose script code is the same for either, in release only.)"""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

sys.path.insert(0, os.path.join(REPO, "bench"))
import gpu_check  # noqa: E402
from attacks import ATTACKS  # noqa: E402
from defenses import DEFENSES, SEMANTICS  # noqa: E402
from gridrun.plan import expand  # noqa: E402
from gridrun.spec import Grid  # noqa: E402
from models import TARGET_MODELS  # noqa: E402


def test_the_defense_grid_holds_every_registered_defense_and_attack(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    path = tmp_path / "grid.json"
    path.write_text(json.dumps(gpu_check.defense_grid("corrected", gpu_check.Sizes(dry=True))))
    steps = expand(Grid(str(path), "grid.json"))
    prunes = [s for s in steps if s.kind == "prune"]
    assert sorted(gpu_check.step_defense(s) for s in prunes) == sorted(DEFENSES)
    for attack in (s for s in steps if s.kind == "attack"):
        assert attack.argv[attack.argv.index("--attacks") + 1] == ",".join(ATTACKS)
        assert attack.argv[attack.argv.index("--semantics") + 1] == "corrected"
        assert ("--adaptive" in attack.argv) == (gpu_check.step_defense(attack) != "base")


def test_most_at_once_counts_overlapping_steps():
    t = lambda s: f"2026-01-01T00:00:{s:02d}.000+00:00"
    records = [
        {"start": t(0), "end": t(10)},
        {"start": t(5), "end": t(15)},
        {"start": t(10), "end": t(20)},
        {"start": t(12), "end": t(13)},
    ]
    assert gpu_check.most_at_once(records) == 3  # 5-15, 10-20 and 12-13; the first ends as the third starts
    assert gpu_check.most_at_once([]) == 0


@pytest.mark.slow
def test_cpu_dry_run_passes_and_lists_every_item(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        ["bash", "bench/gpu_check.sh", "--cpu-dry-run", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    summary = (out / "summary.txt").read_text().splitlines()
    assert summary[0] == "GPU check summary (CPU dry run)"
    rows = {line[:44].strip(): line[44:52].strip() for line in summary[2:-1]}
    models = [f"model {m}{amp}" for m in TARGET_MODELS if m != "columnfc" for amp in ("", " --amp")]
    expected = (
        [f"defense {d} ({SEMANTICS[0]})" for d in DEFENSES]
        + [f"attack {a}" for a in ATTACKS]
        + models
        + ["agreement training (CPU vs CPU)", "agreement inference (CPU models on CPU)", "grid --jobs 2"]
    )
    assert list(rows) == expected
    assert set(rows.values()) == {"PASS"}, proc.stdout[-3000:]
    assert summary[-1] == f"{len(expected)} passed, 0 failed"
    assert proc.returncode == 0
    # the CPU compared with itself: the same numbers, to the last logged digit
    agreement = (out / "agreement.txt").read_text().splitlines()[1:]
    assert agreement and all(len(set(line.split()[-3:])) == 1 for line in agreement)

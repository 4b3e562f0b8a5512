"""grid.py on grids that name one step twice, on a folder, without Slurm, and interrupted: for real, in copies
of the repo (as tests/test_grid.py), no mocks. The Slurm interrupt runs on slurm/local_cluster.sh's cluster
like tests/test_grid.py's Slurm test (it fails without one, or is skipped loudly with WEMEM_ALLOW_NO_SLURM=1)."""

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time

import pytest

from conftest import copy_repo
from test_grid import ENV, RUN, grid, one_error_line, records, start_cluster, tree, write_grid

BASE_ONLY = {"defenses": [{"defend": "base"}]}
DUPLICATES = {"sparsities": [0.6, 0.6], "defenses": [{"defend": "base"}, {"defend": "base"}]}


def three_spellings(copy):
    return ["config/digits.json", "./config/digits.json", os.path.join(copy, "config", "digits.json")]


@pytest.mark.slow
def test_a_folder_two_configs_of_one_run_and_no_slurm_are_one_line(tmp_path):
    copy = copy_repo(tmp_path / "repo")
    before = tree(copy)
    assert (
        one_error_line(grid(copy, "grids").result())
        == "error: grid file grids is a folder; pass a JSON grid file, e.g. grids/digits.json"
    )
    shutil.copy(os.path.join(copy, "config", "digits.json"), os.path.join(copy, "config", "digits_again.json"))
    before = tree(copy)
    two = write_grid(str(tmp_path), "two.json", configs=["config/digits.json", "config/digits_again.json"])
    assert one_error_line(grid(copy, two).result()) == (
        f"error: grid {two}: configs: step {RUN}/pretrain comes twice, from config config/digits.json, seed 7 and "
        f"from config config/digits_again.json, seed 7; each config file needs its own dataset and model"
    )
    no_slurm = grid(copy, write_grid(str(tmp_path), "g.json"), "--backend", "slurm", env=dict(ENV, PATH=str(tmp_path)))
    code, out, err = no_slurm.result()
    assert (code, err) == (1, "error: sinfo not found: install Slurm or use --backend local\n")
    assert tree(copy) == before


@pytest.mark.slow
def test_duplicate_entries_are_one_step_each(tmp_path):
    """[0.6, 0.6], one config written three ways and a repeated setting plan the steps of the plain grid."""
    copy = copy_repo(tmp_path / "repo")
    plain = grid(copy, write_grid(str(tmp_path), "plain.json"), "--dry_run").result()
    dup = write_grid(
        str(tmp_path),
        "dup.json",
        configs=three_spellings(copy),
        **DUPLICATES,
        pruners={"./config/digits.json": "iter_prunetxt"},
    )
    twice = grid(copy, dup, "--dry_run").result()
    assert plain[0] == twice[0] == 0, (plain, twice)
    body = lambda script: [line for line in script.splitlines() if not line.startswith("# /")]
    steps = [line for line in body(twice[1]) if line.startswith("python ")]
    assert len(steps) == len(set(steps)) == 3 and len(body(plain[1])) > len(body(twice[1]))
    assert body(write_base_only_dry_run(copy, tmp_path)) == body(twice[1])


def write_base_only_dry_run(copy, tmp_path):
    code, script, err = grid(copy, write_grid(str(tmp_path), "base.json", **BASE_ONLY), "--dry_run").result()
    assert code == 0, err
    return script


@pytest.mark.slow
def test_duplicate_grid_runs_each_step_once_and_an_interrupt_ends_the_running_step(tmp_path):
    copy = copy_repo(tmp_path / "repo")
    dup = write_grid(str(tmp_path), "dup.json", configs=three_spellings(copy), **DUPLICATES)
    code, out, err = grid(copy, dup, "--jobs", "2", "--no_summary").result()
    assert code == 0, err
    assert set(records(copy)) == {"pretrain", "prune.iter_prunetxt_0.6", "attack.iter_prunetxt_0.6"}
    log = os.path.join(copy, "log", RUN, "iter_prunetxt_0.6_base.txt")
    text = open(log).read()
    assert text.count("Pretrained Victim") == 1 and text.count("Victim pruned model") == 1
    # The same grid with a long prune: the driver gets SIGTERM while the prune runs.
    with open(dup) as f:
        long = {**json.load(f)}
    long["overrides"]["prune"]["prune_epochs"] = 500
    long_path = os.path.join(str(tmp_path), "long.json")
    with open(long_path, "w") as f:
        json.dump(long, f)
    driver = grid(copy, long_path, "--no_summary")
    deadline = time.time() + 300
    while open(log).read().count("Pretrained Victim") < 2 and time.time() < deadline:
        time.sleep(0.1)
    driver.proc.send_signal(signal.SIGTERM)
    code, out, err = driver.result()
    assert code == 143 and err.strip().splitlines()[-1] == (
        "error: interrupted (SIGTERM); the 1 running steps were ended (each keeps only finished models); rerun this "
        "command to run the rest: finished steps are skipped"
    ), err
    deadline = time.time() + 120  # its own wait: on a loaded machine the first one can take most of the 300 s
    while not open(log).read().endswith("Run ended early: interrupted (SIGTERM)\n") and time.time() < deadline:
        time.sleep(0.1)  # the step got SIGTERM as the driver ended, and closes its log block
    assert open(log).read().endswith("Run ended early: interrupted (SIGTERM)\n")
    assert "prune.iter_prunetxt_0.6" not in records(copy)  # its record went when it started; nothing replaced it


@pytest.mark.slow
def test_slurm_driver_interrupt_names_the_jobs_left_on_slurm(tmp_path):
    state_dir = tempfile.mkdtemp(prefix="wemem-i18-slurm-", dir="/tmp")
    slurm_env, stop = start_cluster(state_dir)
    try:
        if not slurm_env:
            if os.environ.get("WEMEM_ALLOW_NO_SLURM") == "1":
                pytest.skip(
                    f"!!! NO SLURM: the Slurm driver's interrupt was NOT TESTED (WEMEM_ALLOW_NO_SLURM=1): {stop}"
                )
            pytest.fail(f"cannot run Slurm here: {stop} (WEMEM_ALLOW_NO_SLURM=1 skips this test)")
        copy = copy_repo(tmp_path / "repo")
        slow = write_grid(str(tmp_path), "slow.json", **BASE_ONLY)
        with open(slow) as f:
            data = json.load(f)
        data["overrides"]["pretrain"]["epochs"] = 500
        with open(slow, "w") as f:
            json.dump(data, f)
        driver = grid(copy, slow, "--backend", "slurm", "--no_summary", env=slurm_env)
        deadline = time.time() + 300
        while not os.path.isdir(os.path.join(copy, "log", "grid_slurm")) and time.time() < deadline:
            time.sleep(0.2)
        time.sleep(2)  # past the submission, into the polling
        driver.proc.send_signal(signal.SIGTERM)
        code, out, err = driver.result()
        last = err.strip().splitlines()[-1]
        found = re.fullmatch(
            r"error: interrupted \(SIGTERM\); (\d+) jobs are still queued or running on Slurm; "
            r"rerun this command to follow them, or scancel ([\d ]+)",
            last,
        )
        assert code == 143 and found, err
        ids = found.group(2).split()
        assert int(found.group(1)) == len(ids) == 3
        queued = subprocess.run(["squeue", "-h", "-o", "%i"], env=slurm_env, capture_output=True, text=True).stdout
        assert set(ids) <= set(queued.split())
        subprocess.run(["scancel", *ids], env=slurm_env, capture_output=True)
    finally:
        if slurm_env and stop:
            stop()
        shutil.rmtree(state_dir, ignore_errors=True)

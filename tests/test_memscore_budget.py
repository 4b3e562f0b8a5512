"""compute_memscore.py before training: the coverage refusal with the smallest model count that passes,
the plan and its cost, and --budget_minutes (with an injected clock: no timed test)."""

import os

import pytest
import torch
from sklearn.datasets import load_digits

import compute_memscore
from common import UsageError
from conftest import REPO, copy_repo, run_script
from datasets import TensorData
from helpers import memscore_recipe


def literal_smallest(n, ratio, seed):
    """The first K >= 2 whose K-model draw gives every sample an in and an out model, sample by sample."""
    for k in range(2, 200):
        masks = compute_memscore.draw_subsets(n, k, ratio, seed)
        if all(masks[:, i].any() and not masks[:, i].all() for i in range(n)):
            return k


@pytest.mark.parametrize("n, ratio, seed", [(200, 0.7, 0), (60, 0.5, 5), (150, 0.3, 2)])
def test_smallest_passing_count_matches_the_literal_search(n, ratio, seed):
    assert compute_memscore.smallest_passing(n, ratio, seed) == literal_smallest(n, ratio, seed)


def test_the_issue_case_2000_rows():
    """2,000 training rows: ratio 0.7 fails up to 25 models, ratio 0.5 needs 17 (seed 7)."""
    assert compute_memscore.smallest_passing(2000, 0.7, 7) == 26
    assert compute_memscore.smallest_passing(2000, 0.5, 7) == 17
    assert compute_memscore.smallest_passing(2000, 0.7, 7, limit=25) is None


def test_refusal_names_the_smallest_count_that_passes():
    masks = compute_memscore.draw_subsets(200, 10, 0.7, seed=0)
    lacking = sum(1 for i in range(200) if masks[:, i].all() or not masks[:, i].any())
    with pytest.raises(UsageError) as err:
        compute_memscore.check_coverage(masks, 0.7, 0)
    assert str(err.value) == (
        f"--num_models 10 leaves {lacking} of 200 samples without both an in and an out "
        f"model; the smallest --num_models that passes with --subset_ratio 0.7 and --seed 0 "
        f"is 11, fewer with a --subset_ratio nearer 0.5 (a sample lacks one with probability "
        f"r^K + (1-r)^K)"
    )
    compute_memscore.check_coverage(compute_memscore.draw_subsets(200, 11, 0.7, seed=0), 0.7, 0)  # passes


@pytest.mark.parametrize(
    "budget, cap, picked",
    [
        (10000, (100, 100), (100, 100)),
        (50000, (100, 100), (100, 100)),
        (2500, (100, 100), (50, 50)),
        (100, (100, 100), (25, 4)),
        (25, (100, 100), (25, 1)),
        (24, (100, 100), None),
        (5000, (100, 20), (100, 20)),
        (1000, (100, 20), (50, 20)),
        (1000, (30, 100), (30, 33)),
    ],
)
def test_budget_picks_the_largest_models_and_epochs_that_fit(budget, cap, picked):
    assert compute_memscore.pick_budget(budget, 25, *cap) == picked


def tiny_args(**overrides):
    return memscore_recipe(**{"epochs": 3, "num_models": 14, "seed": 5, "budget_minutes": None, **overrides})


def tiny_data(n=60):
    digits = load_digits()
    return TensorData(torch.tensor(digits.data[:n] / 16, dtype=torch.float32), torch.tensor(digits.target[:n]))


def clock():
    """A timer that advances one second per call."""
    ticks = iter(range(10**6))
    return lambda: float(next(ticks))


def test_budget_run_equals_the_run_it_picked():
    torch.set_num_threads(1)
    lines, args = [], tiny_args(budget_minutes=0.5)  # 30 one-second epochs; 9 models are the fewest that pass
    scores = compute_memscore.estimate(args, tiny_data(), say=lines.append, timer=clock())
    assert (args.num_models, args.epochs) == (10, 3)
    assert lines[:2] == [
        "Plan: up to 14 models x up to 3 epochs, each on 30 of 60 training samples (--subset_ratio 0.5): up to 42 "
        "training epochs, within 0.5 min",
        "Budget 0.5 min at 1.000s per epoch: picked --num_models 10 --epochs 3 (30 epochs, about 30s; the full "
        "42 epochs would take about 42s)",
    ]
    assert torch.equal(scores, compute_memscore.estimate(tiny_args(num_models=10), tiny_data()))


def test_warm_up_leaves_the_rng_as_it_was():
    torch.manual_seed(0)
    before = torch.get_rng_state()
    compute_memscore.warm_up(tiny_args(), tiny_data(), torch.arange(40))
    assert torch.equal(torch.get_rng_state(), before)


def test_a_budget_too_short_for_the_fewest_models_is_refused():
    with pytest.raises(UsageError) as err:
        compute_memscore.estimate(tiny_args(budget_minutes=0.1), tiny_data(), timer=clock())  # 6 epochs < 9
    assert str(err.value) == (
        "--budget_minutes 0.1 is too short: an epoch takes 1.000s and the smallest run that "
        "passes the coverage check (9 models x 1 epoch) needs 9s; nothing was written"
    )


def test_plan_and_eta_lines():
    torch.set_num_threads(1)
    lines = []
    compute_memscore.estimate(tiny_args(num_models=20, epochs=1), tiny_data(), say=lines.append, timer=clock())
    assert lines[0] == (
        "Plan: 20 models x 1 epochs, each on 30 of 60 training samples (--subset_ratio 0.5): 20 training epochs"
    )
    assert lines[1].startswith("First epoch: 1.000s, so 20 epochs take about 20s (ETA ")
    # a line every 2 models (a tenth), the clock ticking once per line: 2 models in 2 s, 4 in 3 s, ...
    assert [line.split(" (ETA")[0] for line in lines[2:]] == [
        f"{k}/20 models in {k // 2 + 1}s, about {(k // 2 + 1) / k * (20 - k):.0f}s left" for k in range(2, 20, 2)
    ]


@pytest.mark.slow
def test_cli_refuses_too_few_models_before_training(tmp_path):
    repo = copy_repo(tmp_path / "repo", memscores=False)
    proc = run_script(
        "compute_memscore.py",
        "-1",
        os.path.join(REPO, "config", "digits.json"),
        "--num_models",
        "12",
        cwd=tmp_path,
        repo=repo,
        check=False,
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: --num_models 12 leaves ")
    assert lines[0].endswith(
        " of 539 samples without both an in and an out model; the smallest --num_models that "
        "passes with --subset_ratio 0.7 and --seed 7 is 19, fewer with a --subset_ratio nearer "
        "0.5 (a sample lacks one with probability r^K + (1-r)^K)"
    )
    scores = os.path.join(repo, "memscore")
    assert "Plan:" not in proc.stdout and (not os.path.exists(scores) or os.listdir(scores) == [])

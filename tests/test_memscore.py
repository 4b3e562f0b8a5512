"""Mem-scores: the Feldman & Zhang estimator (compute_memscore.py) and the CSV loader of the defenses."""

import hashlib
import json
import os
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

import compute_memscore
from common import MissingError, UsageError
from conftest import REPO, as_repo, copy_repo, run_script
from datasets import TensorData, get_dataset, split_source
from defenses import ML2, DefenseSettings
from helpers import memscore_recipe as recipe
from helpers import one_thread as torch_on_one_thread
from memscores import fingerprint, load_memscores, write_sidecar

DIGITS = os.path.join(REPO, "config", "digits.json")
N_DIGITS_TRAIN = 539


@pytest.fixture
def one_thread():
    """Small models train much faster on one thread than on two contended ones."""
    with torch_on_one_thread():
        yield


def digits_subset(n, flipped=()):
    digits = load_digits()
    y = torch.tensor(digits.target[:n])
    flipped = torch.tensor(flipped, dtype=torch.long)
    y[flipped] = (y[flipped] + 1 + torch.arange(len(flipped)) % 9) % 10  # always a wrong label
    return TensorData(torch.tensor(digits.data[:n] / 16, dtype=torch.float32), y)


def digits_args(**overrides):
    args = SimpleNamespace(
        dataset_name="digits", model_name="columnfc", gpu_id=-1, config_path="config/digits.json", mem_thre=0.6
    )
    vars(args).update(overrides)
    return args


def digits_train():
    """The digits training set as get_dataset makes it under the test's folder (tests call as_repo first)."""
    return get_dataset("digits")[0]


def digits_fields():
    train = digits_train()
    return fingerprint("digits", "columnfc", train.x, train.y, split_source("digits"))


def test_memorization_formula():
    masks = torch.tensor([[1, 0], [0, 1], [1, 0]], dtype=torch.bool)
    correct = torch.tensor([[1, 1], [0, 1], [1, 0]], dtype=torch.bool)
    # sample 0: in models 0, 2 (right, right), out model 1 (wrong) -> 1 - 0
    # sample 1: in model 1 (right), out models 0, 2 (right, wrong) -> 1 - 0.5
    assert compute_memscore.memorization(correct, masks).tolist() == [1.0, 0.5]


def test_subsets_have_the_ratio_and_depend_on_the_seed():
    masks = compute_memscore.draw_subsets(50, 6, 0.7, seed=1)
    assert masks.shape == (6, 50) and masks.sum(1).tolist() == [35] * 6
    assert torch.equal(masks, compute_memscore.draw_subsets(50, 6, 0.7, seed=1))
    assert not torch.equal(masks, compute_memscore.draw_subsets(50, 6, 0.7, seed=2))


def test_too_few_models_are_refused_with_the_count():
    masks = compute_memscore.draw_subsets(200, 3, 0.5, seed=0)
    lacking = sum(1 for i in range(200) if masks[:, i].all() or not masks[:, i].any())
    assert lacking > 0
    with pytest.raises(UsageError, match=f"--num_models 3 leaves {lacking} of 200 samples without both"):
        compute_memscore.check_coverage(masks)


@pytest.mark.slow
def test_flipped_labels_get_high_scores(one_thread):
    flipped = list(range(0, 200, 14))  # 15 samples with a wrong label
    scores = compute_memscore.estimate(recipe(), digits_subset(200, flipped))
    is_flipped = torch.zeros(200, dtype=torch.bool)
    is_flipped[flipped] = True
    assert scores[is_flipped].mean() >= 0.5
    assert scores[~is_flipped].mean() <= 0.2


def test_estimate_is_deterministic_for_a_seed(one_thread):
    data = digits_subset(60)
    first = compute_memscore.estimate(recipe(num_models=14, epochs=2, seed=5), data)
    assert torch.equal(first, compute_memscore.estimate(recipe(num_models=14, epochs=2, seed=5), data))
    assert not torch.equal(first, compute_memscore.estimate(recipe(num_models=14, epochs=2, seed=6), data))


@pytest.mark.slow
def test_cli_writes_the_authors_format_and_the_loader_reads_it(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # tiny models: one thread beats two contended ones
    repo, work = copy_repo(tmp_path / "repo", memscores=False), tmp_path / "work"  # run from elsewhere
    work.mkdir()
    run_script(
        "compute_memscore.py",
        "-1",
        DIGITS,
        "--num_models",
        "24",
        "--subset_ratio",
        "0.5",
        "--epochs",
        "1",
        cwd=work,
        repo=repo,
    )
    assert os.listdir(work) == []  # the scores go to the repo's memscore/, not the working directory's
    path = tmp_path / "repo" / "memscore" / "memscore_digits_columnfc.csv"
    lines = path.read_text().splitlines()
    assert lines[0] == ",0" and len(lines) == 1 + N_DIGITS_TRAIN
    assert [line.split(",")[0] for line in lines[1:]] == [str(i) for i in range(N_DIGITS_TRAIN)]
    written = torch.tensor([float(line.split(",")[1]) for line in lines[1:]], dtype=torch.float64)
    assert written.min() >= -1 and written.max() <= 1
    as_repo(monkeypatch, repo)
    assert torch.equal(load_memscores(digits_args(), digits_train()), written)
    sidecar = json.loads((tmp_path / "repo" / "memscore" / "memscore_digits_columnfc.json").read_text())
    assert sidecar == {**digits_fields(), "csv_sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    # a second run refuses to overwrite the file
    monkeypatch.setattr(sys, "argv", ["compute_memscore.py", "-1", DIGITS, "--num_models", "24"])
    with pytest.raises(UsageError, match="already exists; pass --force"):
        compute_memscore.main()


def test_csv_round_trip_is_exact(tmp_path, monkeypatch):
    scores = torch.from_numpy(np.random.default_rng(0).uniform(-0.2, 1.0, N_DIGITS_TRAIN))
    as_repo(monkeypatch, tmp_path)
    compute_memscore.write_memscores(os.path.join("memscore", "memscore_digits_columnfc.csv"), scores, digits_fields())
    assert torch.equal(load_memscores(digits_args(), digits_train()), scores)


def write_csv(tmp_path, text):
    """A CSV with a sidecar for the digits training set, so that the format checks are what is tested."""
    path = os.path.join("memscore", "memscore_digits_columnfc.csv")
    os.makedirs(tmp_path / "memscore", exist_ok=True)
    (tmp_path / path).write_text(text)
    write_sidecar(str(tmp_path / path), text.encode(), digits_fields())


def test_loader_rejects_a_file_of_the_wrong_length(tmp_path, monkeypatch):
    as_repo(monkeypatch, tmp_path)
    write_csv(tmp_path, ",0\n" + "".join(f"{i},0.5\n" for i in range(10)))
    with pytest.raises(MissingError) as err:
        load_memscores(digits_args(), digits_train())
    assert str(err.value) == (
        "mem-scores memscore/memscore_digits_columnfc.csv has 10 rows but the training set has 539 samples "
        "(made for another dataset or split); compute it with python compute_memscore.py -1 config/digits.json "
        "(docs/defenses.md)"
    )


@pytest.mark.parametrize(
    "text, message",
    [
        (",score\n0,0.5\n", "one numeric column named 0"),
        (",0\n0,high\n", "one numeric column named 0"),
        ("", "is not a readable CSV"),
    ],
)
def test_loader_rejects_malformed_files(tmp_path, monkeypatch, text, message):
    as_repo(monkeypatch, tmp_path)
    write_csv(tmp_path, text)
    with pytest.raises(MissingError, match=message):
        load_memscores(digits_args(), digits_train())


def test_loader_rejects_nan_and_a_shuffled_index(tmp_path, monkeypatch):
    as_repo(monkeypatch, tmp_path)
    rows = [f"{i},0.1\n" for i in range(N_DIGITS_TRAIN)]
    write_csv(tmp_path, ",0\n" + "".join(rows[:5] + ["5,\n"] + rows[6:]))
    with pytest.raises(MissingError, match="row 5 is not a number"):
        load_memscores(digits_args(), digits_train())
    write_csv(tmp_path, ",0\n" + "".join(rows[1:2] + rows[:1] + rows[2:]))
    with pytest.raises(MissingError, match="index column must count 0..538 in order"):
        load_memscores(digits_args(), digits_train())


def test_missing_file_says_how_to_get_it(tmp_path, monkeypatch):
    as_repo(monkeypatch, tmp_path)
    with pytest.raises(MissingError) as err:
        load_memscores(digits_args(), digits_train())
    assert str(err.value) == (
        "mem-scores memscore/memscore_digits_columnfc.csv not found; compute it with "
        "python compute_memscore.py -1 config/digits.json (docs/defenses.md)"
    )
    cifar = digits_args(dataset_name="cifar10", model_name="resnet18", config_path="config/cifar10_resnet18.json")
    with pytest.raises(MissingError, match="memscore_cifar10_resnet18.csv not found; put the authors' published CSV"):
        load_memscores(cifar, digits_train())  # the file is looked for before the data


def test_ml2_rejects_a_threshold_outside_the_scores(tmp_path, monkeypatch):
    scores = torch.linspace(-0.1, 0.8, N_DIGITS_TRAIN, dtype=torch.float64)
    as_repo(monkeypatch, tmp_path)
    path = os.path.join("memscore", "memscore_digits_columnfc.csv")
    compute_memscore.write_memscores(path, scores, digits_fields())
    loaded = load_memscores(digits_args(), digits_train())
    assert torch.equal(loaded, scores)
    ML2.check_memscores(loaded, DefenseSettings(mem_thre=0.8), "m.csv")  # the top score itself is fine
    with pytest.raises(
        UsageError, match=r"--mem_thre 0.9 is outside the mem-scores' range \[-0.100, 0.800\] \(m.csv\)"
    ):
        ML2.check_memscores(loaded, DefenseSettings(mem_thre=0.9), "m.csv")

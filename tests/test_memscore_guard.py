"""Mem-scores must belong to the split they are used with: the fingerprint sidecar written by
compute_memscore.py and the checks of memscores.load_memscores (docs/defenses.md#mem-scores)."""

import hashlib
import json
import os
import pickle
import shutil
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import Subset, TensorDataset

import compute_memscore
import memscores
from common import MissingError
from conftest import REPO, as_repo, copy_repo, run_script
from datasets import TensorData, get_dataset, split_source
from helpers import pretrain_cmd, prune_cmd
from memscores import fingerprint, load_memscores
from paths import memscore_path
from test_datasets import write_location

DATA = os.path.join("data", "datasets")
RECOMPUTE = "python compute_memscore.py -1 config/{}.json --force"
LOCATION_CSV = os.path.join("memscore", "memscore_location_columnfc.csv")
DIGITS_CSV = os.path.join("memscore", "memscore_digits_columnfc.csv")


@pytest.fixture
def here(tmp_path, monkeypatch):
    """Every test runs in an empty folder that stands in for the repo's data/datasets/ and memscore/
    (conftest.as_repo): the messages name them relative to it."""
    as_repo(monkeypatch, tmp_path)
    return tmp_path


def args_for(dataset, model="columnfc"):
    return SimpleNamespace(dataset_name=dataset, model_name=model, gpu_id=-1, config_path=f"config/{dataset}.json")


def scores_for(n, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).uniform(0, 1, n))


def compute(dataset, model="columnfc"):
    """What compute_memscore.py writes for the current training set (scores drawn, not estimated)."""
    train = get_dataset(dataset)[0]
    fields = fingerprint(dataset, model, train.x, train.y, split_source(dataset))
    scores = scores_for(len(train))
    compute_memscore.write_memscores(memscore_path(dataset, model), scores, fields)
    return scores


def write_authors_csv(path, n):
    """A CSV as the authors publish it: no sidecar."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pd.DataFrame(scores_for(n).numpy()).to_csv(path)


def write_authors_location_pkl(train_idx, test_idx):
    """location.pkl as the release pickles it: two torch Subsets of the whole dataset."""
    with np.load(os.path.join(DATA, "location", "data_complete.npz")) as f:
        full = TensorDataset(torch.from_numpy(f["x"]), torch.from_numpy(f["y"]))
    with open(os.path.join(DATA, "location", "location.pkl"), "wb") as f:
        pickle.dump((Subset(full, train_idx), Subset(full, test_idx)), f)


def list_as_authors(monkeypatch, *names):
    """A hash list the test controls, in place of the shipped one: the files `names` (relative to the
    test's folder, which stands in for the repo) as they are now, and nothing else."""
    lines = [f"{hashlib.sha256(open(name, 'rb').read()).hexdigest()}  {name.replace(os.sep, '/')}\n" for name in names]
    with open("authors-files.sha256", "w") as f:
        f.write("# the test's list\n" + "".join(lines))
    monkeypatch.setattr(memscores, "AUTHORS_HASHES", os.path.abspath("authors-files.sha256"))


def load(dataset, model="columnfc"):
    return load_memscores(args_for(dataset, model), get_dataset(dataset)[0])


def refused(dataset, model="columnfc", data=None):
    """The one-line message of the MissingError (exit status 1) that loading raises."""
    with pytest.raises(MissingError) as err:
        load_memscores(args_for(dataset, model), get_dataset(dataset)[0] if data is None else data)
    assert err.value.exit_code == 1 and "\n" not in str(err.value)
    return str(err.value)


def sha(dataset):
    train = get_dataset(dataset)[0]
    return memscores.train_sha256(train.x, train.y)[:12]


# ---------------------------------------------------------------- the fingerprint


def test_sidecar_records_the_training_set_and_the_csv(here):
    scores = compute("digits")
    record = json.loads((here / "memscore" / "memscore_digits_columnfc.json").read_text())
    csv = (here / DIGITS_CSV).read_bytes()
    assert record == {
        "dataset": "digits",
        "model": "columnfc",
        "n_train": 539,
        "split": "seeded 30/70 split (random_state 0)",
        "train_sha256": record["train_sha256"],
        "csv_sha256": hashlib.sha256(csv).hexdigest(),
    }
    assert record["train_sha256"].startswith(sha("digits")) and len(record["train_sha256"]) == 64
    assert torch.equal(load("digits"), scores)


def test_train_sha256_sees_order_content_and_labels():
    x, y = torch.arange(12, dtype=torch.float32).view(4, 3), torch.tensor([0, 1, 2, 3])
    base = memscores.train_sha256(x, y)
    assert base == memscores.train_sha256(x.clone(), y.clone())
    assert base != memscores.train_sha256(x[[1, 0, 2, 3]], y[[1, 0, 2, 3]])  # same rows, another order
    assert base != memscores.train_sha256(x, torch.tensor([0, 1, 2, 4]))
    changed = x.clone()
    changed[3, 2] += 1
    assert base != memscores.train_sha256(changed, y)
    assert base != memscores.train_sha256(x.to(torch.uint8), y)  # same values, other dtype


def test_source_names_the_split_in_use(here):
    assert split_source("cifar10") == "official training set order"
    assert split_source("location") == "seeded 80/20 split (random_state 0)"
    assert split_source("cinic") == "drawn subset (seed 0)"
    os.makedirs(os.path.join(DATA, "cinic"))
    open(os.path.join(DATA, "cinic", "train_test_idx.pkl"), "wb").close()
    assert split_source("cinic") == "authors' train_test_idx.pkl"


# ---------------------------------------------------------------- computed files and a changed split


def test_scores_of_a_remade_split_are_refused(here):
    write_location(DATA)
    compute("location")
    before = sha("location")
    assert len(load("location")) == 16
    split = os.path.join(DATA, "location", "location_split.npz")
    with np.load(split) as f:  # another 16/4 split of the same 20 rows
        np.savez(split, train=np.roll(f["train"], 1), test=f["test"], n=f["n"])
    seeded = "seeded 80/20 split (random_state 0)"
    assert refused("location") == (
        f"mem-scores {LOCATION_CSV} score another training set: they were made for location [{seeded}, 16 samples, "
        f"train_sha256 {before}], this run trains on location [{seeded}, 16 samples, train_sha256 {sha('location')}]; "
        f"restore the files in data/datasets/location/ they were made with, or recompute them for this split with "
        f"{RECOMPUTE.format('location')}"
    )


def test_scores_follow_the_authors_split_file(here):
    write_location(DATA)
    compute("location")  # on our seeded split
    ours = sha("location")
    write_authors_location_pkl([3, 17, 0, 8, 11, 5], [19, 2, 7])
    message = refused("location")
    assert (
        f"they were made for location [seeded 80/20 split (random_state 0), 16 samples, train_sha256 {ours}], "
        f"this run trains on location [authors' location.pkl, 6 samples, train_sha256 {sha('location')}]; "
        f"move location.pkl out of data/datasets/location/, or recompute"
    ) in message

    compute("location")  # now on the authors' split
    assert len(load("location")) == 6
    os.remove(os.path.join(DATA, "location", "location.pkl"))
    message = refused("location")
    assert "they were made for location [authors' location.pkl, 6 samples" in message
    assert message.endswith(
        f"; put location.pkl back into data/datasets/location/, or recompute them for this "
        f"split with {RECOMPUTE.format('location')}"
    )


def test_scores_of_another_dataset_are_refused(here):
    write_location(DATA)
    compute("location")
    shutil.copy("memscore/memscore_location_columnfc.json", "memscore/memscore_digits_columnfc.json")
    shutil.copy(LOCATION_CSV, DIGITS_CSV)
    message = refused("digits")
    assert message.startswith(f"mem-scores {DIGITS_CSV} score another training set: they were made for location [")
    assert message.endswith(f"]; recompute them for this split with {RECOMPUTE.format('digits')}")


# ---------------------------------------------------------------- CSV and sidecar that are not a pair


def test_a_csv_that_disagrees_with_its_sidecar_is_refused(here):
    compute("digits")
    csv = (here / DIGITS_CSV).read_text().splitlines(keepends=True)
    (here / DIGITS_CSV).write_text("".join(csv[:-10]))  # 529 rows, the sidecar says 539
    assert refused("digits") == (
        f"mem-scores {DIGITS_CSV} and their fingerprint memscore/memscore_digits_columnfc.json were not written "
        f"together (an interrupted compute_memscore.py or an edited file); recompute them with "
        f"{RECOMPUTE.format('digits')}"
    )


def test_a_sidecar_edited_to_another_size_is_refused(here):
    compute("digits")
    path = here / "memscore" / "memscore_digits_columnfc.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "n_train": 1000}))
    assert "they were made for digits [seeded 30/70 split (random_state 0), 1000 samples" in refused("digits")


def test_a_kill_between_sidecar_and_csv_leaves_a_refused_pair(here, monkeypatch):
    compute("digits")
    write = memscores.atomic_write

    def killed_at_the_csv(path, fn):
        if path.endswith(".csv"):
            raise KeyboardInterrupt
        write(path, fn)

    monkeypatch.setattr(memscores, "atomic_write", killed_at_the_csv)
    train = get_dataset("digits")[0]
    fields = fingerprint("digits", "columnfc", train.x, train.y, split_source("digits"))
    with pytest.raises(KeyboardInterrupt):
        compute_memscore.write_memscores(DIGITS_CSV, scores_for(539, seed=1), fields)
    assert "were not written together" in refused("digits")


def test_an_unreadable_sidecar_is_refused(here):
    compute("digits")
    (here / "memscore" / "memscore_digits_columnfc.json").write_text('{"dataset": "digits"}')
    assert refused("digits") == (
        "mem-score fingerprint memscore/memscore_digits_columnfc.json is unreadable or lacks one of dataset, model, "
        f"n_train, split, train_sha256, csv_sha256; recompute the scores with {RECOMPUTE.format('digits')}"
    )


# ---------------------------------------------------------------- files without a sidecar


def test_authors_location_file_needs_their_split(here, monkeypatch):
    write_location(DATA)
    write_authors_csv(LOCATION_CSV, 16)  # as many rows as our split has
    list_as_authors(monkeypatch, LOCATION_CSV)
    assert refused("location") == (
        f"mem-scores {LOCATION_CSV} carry no fingerprint and look like the authors' published file, which scores "
        f"the authors' split (location.pkl); put location.pkl into data/datasets/location/ or compute scores for "
        f"this split with {RECOMPUTE.format('location')}"
    )
    write_authors_location_pkl([3, 17, 0, 8, 11, 5], [19, 2, 7])
    write_authors_csv(LOCATION_CSV, 6)
    list_as_authors(monkeypatch, LOCATION_CSV)
    assert len(load("location")) == 6


def test_authors_cinic_file_needs_their_index_file(here, monkeypatch):
    cinic = memscore_path("cinic", "resnet18")
    write_authors_csv(cinic, 4)
    list_as_authors(monkeypatch, cinic)
    data = TensorData(torch.zeros(4, 3, 32, 32, dtype=torch.uint8), torch.zeros(4, dtype=torch.int64))
    message = refused("cinic", "resnet18", data)
    assert (
        "look like the authors' published file, which scores the authors' split (train_test_idx.pkl); put "
        "train_test_idx.pkl into data/datasets/cinic/ or compute scores" in message
    )
    index_file = os.path.join(DATA, "cinic", "train_test_idx.pkl")
    os.makedirs(os.path.join(DATA, "cinic"))
    open(index_file, "wb").close()
    list_as_authors(monkeypatch, cinic, index_file)
    assert len(load_memscores(args_for("cinic", "resnet18"), data)) == 4
    with open(index_file, "wb") as f:  # another index file under the authors' name
        f.write(b"not the authors'")
    assert refused("cinic", "resnet18", data) == (
        f"mem-scores {cinic} are the authors' published file, which scores the authors' split, but {index_file} is "
        f"not the authors' train_test_idx.pkl (its SHA-256 is not the one memscore/authors-files.sha256 lists); put "
        f"the authors' train_test_idx.pkl there or compute scores for this split with "
        f"python compute_memscore.py -1 config/cinic.json --force"
    )


def test_authors_cifar_file_is_recognised_by_its_hash(here, monkeypatch):
    path = memscore_path("cifar10", "resnet18")
    write_authors_csv(path, 5)
    data = TensorData(torch.zeros(5, 3, 32, 32, dtype=torch.uint8), torch.zeros(5, dtype=torch.int64))
    list_as_authors(monkeypatch, path)
    assert len(load_memscores(args_for("cifar10", "resnet18"), data)) == 5
    with open(path, "a") as f:  # one more byte: no longer the listed file
        f.write("\n")
    digest = hashlib.sha256(open(path, "rb").read()).hexdigest()
    assert refused("cifar10", "resnet18", data) == (
        f"mem-scores {path} carry no fingerprint (memscore/memscore_cifar10_resnet18.json) and are not the authors' "
        f"published file (SHA-256 {digest[:12]}... is not the one memscore/authors-files.sha256 lists for it); put "
        f"the authors' CSV there, or recompute them with python compute_memscore.py -1 config/cifar10.json --force "
        f"(it writes the fingerprint)"
    )


def test_an_authors_name_csv_off_the_shipped_list_is_refused(here):
    """Against the shipped list: a CSV under an authors' name, without sidecar, is refused (today's files
    were accepted unchecked for CIFAR)."""
    for dataset, model in (("cifar10", "resnet18"), ("cifar100", "vgg16bn"), ("cinic", "densenet121")):
        write_authors_csv(memscore_path(dataset, model), 5)
        data = TensorData(torch.zeros(5, 3, 32, 32, dtype=torch.uint8), torch.zeros(5, dtype=torch.int64))
        assert "carry no fingerprint" in refused(dataset, model, data)
        assert "are not the authors' published file" in refused(dataset, model, data)


def test_the_shipped_hash_list():
    """memscore/authors-files.sha256 parses, names every authors' CSV the code knows plus CINIC's index file,
    and is, byte for byte, the list taken from the release (its own SHA-256 pinned here)."""
    listed = memscores.read_hash_list()
    csvs = {name for name in listed if name.startswith("memscore/")}
    assert csvs == {f"memscore/memscore_{ds}_{model}.csv" for ds, model in memscores.AUTHORS_MEMSCORES}
    assert set(listed) - csvs == {"data/datasets/cinic/train_test_idx.pkl"}
    assert (
        listed["memscore/memscore_location_columnfc.csv"]
        == "5b39132645fb64d9b127221c7df745dcd25c41b5f7fcd38b7f095048fc5bcf47"
    )
    with open(memscores.AUTHORS_HASHES, "rb") as f:
        shipped = hashlib.sha256(f.read()).hexdigest()
    assert shipped == "e85590aa9581873a646b034facc58c3973699ff69da4832b1505ab971a604d82"


@pytest.mark.parametrize("line", ["abc  memscore/x.csv", f"{'0' * 64} memscore/x.csv", f"{'g' * 64}  x.csv"])
def test_a_broken_hash_list_is_refused(tmp_path, line):
    path = tmp_path / "list.sha256"
    path.write_text(f"# comment\n{'1' * 64}  memscore/ok.csv\n{line}\n")
    with pytest.raises(MissingError, match=f"{path} line 3 is not '<sha256>  <file>'; restore it from the repo"):
        memscores.read_hash_list(str(path))
    path.write_text(f"# comment\n\n{'1' * 64}  memscore/ok.csv\n")
    assert memscores.read_hash_list(str(path)) == {"memscore/ok.csv": "1" * 64}


def test_a_file_the_authors_do_not_publish_needs_a_sidecar(here):
    write_authors_csv(DIGITS_CSV, 539)
    assert refused("digits") == (
        f"mem-scores {DIGITS_CSV} carry no fingerprint (memscore/memscore_digits_columnfc.json) and the authors "
        f"publish none for digits_columnfc, so nothing says which training set they score; recompute them with "
        f"{RECOMPUTE.format('digits')} (it writes the fingerprint)"
    )


# ---------------------------------------------------------------- the shipped file and the scripts


def test_shipped_digits_scores_load_with_their_sidecar(here):
    os.makedirs("memscore")
    for name in ("memscore_digits_columnfc.csv", "memscore_digits_columnfc.json"):
        shutil.copy(os.path.join(REPO, "memscore", name), "memscore")
    record = json.loads(open("memscore/memscore_digits_columnfc.json").read())
    assert record["csv_sha256"] == hashlib.sha256(open(DIGITS_CSV, "rb").read()).hexdigest()
    shipped = memscores.read_memscores(DIGITS_CSV, 539, "")
    assert torch.equal(load("digits"), shipped)


@pytest.mark.slow
def test_prune_modi_refuses_before_its_first_log_line(here):
    copy_repo(here, memscores=False)  # the scripts run from here: its memscore/ is theirs
    run_script(*pretrain_cmd(1, 1, "--quiet"), cwd=here, repo=here)
    write_authors_csv(DIGITS_CSV, 539)
    slide_re = ["--defend", "slide_re", "--stride", "1", "--width", "15"]
    proc = run_script(*prune_cmd(2, 1, "--quiet", "--no_tensorboard", *slide_re), cwd=here, check=False, repo=here)
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"error: mem-scores {here / DIGITS_CSV} carry no fingerprint")
    assert os.listdir(here / "log" / "digits_columnfc") == ["pretrain.txt"]

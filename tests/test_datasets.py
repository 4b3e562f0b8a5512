import os
import pickle
import sys

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from sklearn.model_selection import train_test_split
from torch.utils.data import Subset, TensorDataset
from torchvision import transforms

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import datasets  # noqa: E402
from common import MissingError, UsageError  # noqa: E402
from datasets import TensorData, get_dataset, split_source  # noqa: E402


def rng_for(seed=0):
    return np.random.default_rng(seed)


def torchvision_reference(images, mean, std):
    """ToTensor + Normalize on each uint8 (3,32,32) image, the way the release's loaders did it."""
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])
    return torch.stack([tf(Image.fromarray(img.transpose(1, 2, 0))) for img in images])


# ---------------------------------------------------------------- TensorData


def test_batch_normalises_like_torchvision():
    images = rng_for().integers(0, 256, (6, 3, 32, 32), dtype=np.uint8)
    mean, std = datasets.MEAN_STD["cifar10"]
    data = TensorData(torch.from_numpy(images), torch.arange(6), mean, std)
    idx = torch.tensor([4, 0, 2])
    x, y = data.batch(idx)
    assert x.dtype == torch.float32 and x.shape == (3, 3, 32, 32)
    assert torch.equal(x, torchvision_reference(images[[4, 0, 2]], mean, std))
    assert y.tolist() == [4, 0, 2]


def test_tabular_batch_to_and_concat():
    a = TensorData(torch.arange(6, dtype=torch.float32).view(3, 2), torch.tensor([0, 1, 2]))
    b = TensorData(torch.full((2, 2), 9.0), torch.tensor([5, 6]))
    both = TensorData.concat(a, b).to("cpu")
    assert len(both) == 5 and both.mean is None
    x, y = both.batch(torch.tensor([1, 3]))
    assert x.tolist() == [[2.0, 3.0], [9.0, 9.0]] and y.tolist() == [1, 5]
    image = TensorData(torch.zeros(1, 3, 32, 32, dtype=torch.uint8), torch.tensor([0]), (0.5,) * 3, (0.5,) * 3)
    with pytest.raises(ValueError):
        TensorData.concat(a, image)


def test_unknown_name_lists_valid_names(tmp_path):
    with pytest.raises(UsageError) as err:
        get_dataset("mnist", root=tmp_path)
    assert "mnist" in str(err.value) and "cifar10" in str(err.value) and "digits" in str(err.value)


# ---------------------------------------------------------------- CIFAR


def write_cifar_batch(path, n, num_cls, label_key, seed):
    rng = rng_for(seed)
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = rng.integers(0, num_cls, n).tolist()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump({b"batch_label": b"x", label_key: labels, b"data": data}, f)
    return data, labels


def write_cifar10(root):
    batches = os.path.join(root, "cifar10-data", "cifar-10-batches-py")
    train = [write_cifar_batch(os.path.join(batches, f"data_batch_{i}"), 3, 10, b"labels", i) for i in range(1, 6)]
    test = write_cifar_batch(os.path.join(batches, "test_batch"), 4, 10, b"labels", 9)
    return batches, train, test


def test_cifar10_reads_batch_files(tmp_path):
    _, train_batches, (test_data, test_labels) = write_cifar10(tmp_path)
    train, test = get_dataset("cifar10", root=tmp_path)
    assert train.x.shape == (15, 3, 32, 32) and train.x.dtype == torch.uint8 and train.y.dtype == torch.int64
    assert test.x.shape == (4, 3, 32, 32)
    expected = np.concatenate([d for d, _ in train_batches]).reshape(-1, 3, 32, 32)
    assert np.array_equal(train.x.numpy(), expected)
    assert train.y.tolist() == sum((labels for _, labels in train_batches), [])
    assert test.y.tolist() == test_labels
    mean, std = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
    x, _ = test.batch(torch.arange(4))
    assert torch.equal(x, torchvision_reference(test_data.reshape(-1, 3, 32, 32), mean, std))


def test_cifar100_uses_fine_labels_and_its_normalisation(tmp_path):
    batches = os.path.join(tmp_path, "cifar100-data", "cifar-100-python")
    data, labels = write_cifar_batch(os.path.join(batches, "train"), 5, 100, b"fine_labels", 1)
    write_cifar_batch(os.path.join(batches, "test"), 2, 100, b"fine_labels", 2)
    train, test = get_dataset("cifar100", root=tmp_path)
    assert len(train) == 5 and len(test) == 2 and train.y.tolist() == labels
    mean, std = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)
    x, _ = train.batch(torch.tensor([3, 1]))
    assert torch.equal(x, torchvision_reference(data.reshape(-1, 3, 32, 32)[[3, 1]], mean, std))


def test_cifar_downloads_only_when_the_folder_is_absent(tmp_path, monkeypatch):
    calls = []

    class FakeCIFAR10:
        def __init__(self, root, train, download):
            calls.append((root, train, download))
            write_cifar10(os.path.dirname(root))

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    train, test = get_dataset("cifar10", root=tmp_path)
    assert calls == [(os.path.join(tmp_path, "cifar10-data"), True, True)]
    assert len(train) == 15 and len(test) == 4
    get_dataset("cifar10", root=tmp_path)
    assert len(calls) == 1


def test_cifar_failed_download_names_folder_and_link(tmp_path, monkeypatch):
    def offline(root, train, download):
        raise OSError("network unreachable")

    monkeypatch.setattr(torchvision.datasets, "CIFAR100", offline)
    with pytest.raises(MissingError) as err:
        get_dataset("cifar100", root=tmp_path)
    message = str(err.value)
    assert os.path.join(str(tmp_path), "cifar100-data") in message and "cifar-100-python.tar.gz" in message
    assert "\n" not in message


def test_cifar_missing_or_malformed_batch(tmp_path):
    batches, _, _ = write_cifar10(tmp_path)
    os.remove(os.path.join(batches, "data_batch_3"))
    with pytest.raises(MissingError, match="data_batch_3 not found"):
        get_dataset("cifar10", root=tmp_path)
    with open(os.path.join(batches, "data_batch_3"), "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(MissingError, match=r"data_batch_3 has data uint8 \(2, 100\)"):
        get_dataset("cifar10", root=tmp_path)
    with open(os.path.join(batches, "data_batch_3"), "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, f)
    with pytest.raises(MissingError, match=r"labels outside 0\.\.9"):
        get_dataset("cifar10", root=tmp_path)


# ---------------------------------------------------------------- CINIC


def write_cinic(root, counts=None):
    """Classes created out of order, files named so that sorted order differs from creation order."""
    counts = counts or {"train": 7, "test": 5}
    rng = rng_for(3)
    for split, n in counts.items():
        for i in range(n):
            cls = ["truck", "airplane", "bird"][i % 3]
            folder = os.path.join(root, "cinic", split, cls)
            os.makedirs(folder, exist_ok=True)
            pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(os.path.join(folder, f"img_{n - i:03d}.png"))


def test_cinic_image_folder_order_subset_and_caches(tmp_path, monkeypatch):
    write_cinic(tmp_path)
    train, test = get_dataset("cinic", root=tmp_path)
    reference = torchvision.datasets.ImageFolder(os.path.join(tmp_path, "cinic", "train"))
    assert reference.classes == ["airplane", "bird", "truck"]
    expected = np.stack([np.asarray(img).transpose(2, 0, 1) for img, _ in reference])
    assert train.x.dtype == torch.uint8 and np.array_equal(train.x.numpy(), expected)
    assert train.y.tolist() == reference.targets and len(test) == 5  # 90000/31499 capped at what exists
    mean, std = datasets.MEAN_STD["cinic"]
    assert torch.equal(train.batch(torch.tensor([2]))[0], torchvision_reference(expected[[2]], mean, std))

    cinic = os.path.join(tmp_path, "cinic")
    subset = os.path.join(cinic, "train_test_idx.npz")
    with np.load(subset) as f:
        assert f["train"].tolist() == list(range(7)) and f["test"].tolist() == list(range(5))
    assert os.path.isfile(os.path.join(cinic, "train_images.npy"))
    before = open(subset, "rb").read()

    def no_decoding(path):
        raise AssertionError("the decoded cache should have been used")

    monkeypatch.setattr(datasets, "_decode_image", no_decoding)
    again, _ = get_dataset("cinic", root=tmp_path)
    assert torch.equal(again.x, train.x) and open(subset, "rb").read() == before


def test_cinic_authors_index_file(tmp_path):
    write_cinic(tmp_path)
    with open(os.path.join(tmp_path, "cinic", "train_test_idx.pkl"), "wb") as f:
        pickle.dump([[6, 0, 3], [4, 1]], f)
    train, test = get_dataset("cinic", root=tmp_path)
    train_ref, test_ref = (
        torchvision.datasets.ImageFolder(os.path.join(tmp_path, "cinic", split)) for split in ("train", "test")
    )
    assert train.y.tolist() == [train_ref.targets[i] for i in (6, 0, 3)] == [2, 0, 1]
    assert test.y.tolist() == [test_ref.targets[i] for i in (4, 1)]
    assert np.array_equal(test.x[0].numpy(), np.asarray(test_ref[4][0]).transpose(2, 0, 1))
    assert not os.path.exists(os.path.join(tmp_path, "cinic", "train_test_idx.npz"))


def test_cinic_missing_and_bad_files(tmp_path):
    with pytest.raises(MissingError) as err:
        get_dataset("cinic", root=tmp_path)
    assert os.path.join(str(tmp_path), "cinic", "train") in str(err.value) and "CINIC-10.tar.gz" in str(err.value)
    write_cinic(tmp_path)
    Image.new("RGB", (40, 40)).save(os.path.join(tmp_path, "cinic", "train", "bird", "img_big.png"))
    with pytest.raises(MissingError, match="img_big.png is 40x40, expected 32x32"):
        get_dataset("cinic", root=tmp_path)


# ---------------------------------------------------------------- tabular


def write_location(root, n=20, y=None):
    rng = rng_for(5)
    x = rng.integers(0, 2, (n, 446)).astype(np.float32)
    y = rng.integers(1, 31, n) if y is None else y
    os.makedirs(os.path.join(root, "location"), exist_ok=True)
    np.savez(os.path.join(root, "location", "data_complete.npz"), x=x, y=y)
    return x, y


def test_location_split_matches_train_test_split_and_is_cached(tmp_path):
    x, y = write_location(tmp_path)
    train, test = get_dataset("location", root=tmp_path)
    want_train, want_test = train_test_split(range(20), test_size=0.2, random_state=datasets.TABULAR_SPLIT_SEED)
    assert train.x.dtype == torch.float32 and train.x.shape == (16, 446) and len(test) == 4
    assert np.array_equal(train.x.numpy(), x[want_train]) and np.array_equal(test.x.numpy(), x[want_test])
    assert train.y.dtype == torch.int64 and train.y.tolist() == (y[want_train] - 1).tolist()
    assert train.mean is None and torch.equal(train.batch(torch.tensor([0]))[0], train.x[:1])

    split = os.path.join(tmp_path, "location", "location_split.npz")
    before, mtime = open(split, "rb").read(), os.stat(split).st_mtime_ns
    again, _ = get_dataset("location", root=tmp_path)
    assert open(split, "rb").read() == before and os.stat(split).st_mtime_ns == mtime
    assert torch.equal(again.x, train.x)


def test_cached_split_for_other_n_is_an_error(tmp_path):
    write_location(tmp_path, n=20)
    get_dataset("location", root=tmp_path)
    write_location(tmp_path, n=25)
    with pytest.raises(MissingError, match="made for 20 rows but the data has 25; delete it"):
        get_dataset("location", root=tmp_path)


@pytest.mark.parametrize("how", ["pair", "one_after_the_other", "torch.save"])
def test_authors_pickled_subsets_give_the_split(tmp_path, how):
    x, y = write_location(tmp_path)
    full = TensorDataset(torch.from_numpy(x), torch.from_numpy(y - 1))
    train_idx, test_idx = [3, 17, 0, 8, 11, 5], [19, 2, 7]
    train_set, test_set = Subset(full, train_idx), Subset(full, test_idx)
    with open(os.path.join(tmp_path, "location", "location.pkl"), "wb") as f:
        if how == "pair":
            pickle.dump((train_set, test_set), f)
        elif how == "one_after_the_other":
            pickle.dump(train_set, f)
            pickle.dump(test_set, f)
        else:
            torch.save((train_set, test_set), f)
    train, test = get_dataset("location", root=tmp_path)
    assert np.array_equal(train.x.numpy(), x[train_idx]) and test.y.tolist() == (y[test_idx] - 1).tolist()
    assert not os.path.exists(os.path.join(tmp_path, "location", "location_split.npz"))


def test_authors_pickle_runs_no_foreign_code(tmp_path):
    write_location(tmp_path)
    with open(os.path.join(tmp_path, "location", "location.pkl"), "wb") as f:
        pickle.dump((Subset([], [0]), os.system), f)  # os.system must come back as an inert stand-in
    with pytest.raises(MissingError, match="should hold two torch Subset objects, found .*system"):
        get_dataset("location", root=tmp_path)


def write_texas(root, n=12, features=6169, labels=None):
    rng = rng_for(7)
    x = rng.integers(0, 2, (n, features))
    y = rng.integers(1, 101, n) if labels is None else labels
    folder = os.path.join(root, "texas")
    os.makedirs(folder, exist_ok=True)
    np.savetxt(os.path.join(folder, "feats.txt"), x, fmt="%d", delimiter=",")
    np.savetxt(os.path.join(folder, "labels.txt"), y, fmt="%d")
    return x, y


def test_texas_reads_feats_and_labels(tmp_path):
    x, y = write_texas(tmp_path)
    train, test = get_dataset("texas100", root=tmp_path)
    want_train, want_test = train_test_split(range(12), test_size=0.2, random_state=0)
    assert train.x.shape == (9, 6169) and test.x.shape == (3, 6169) and train.x.dtype == torch.float32
    assert np.array_equal(test.x.numpy(), x[want_test]) and test.y.tolist() == (y[want_test] - 1).tolist()
    assert os.path.isfile(os.path.join(tmp_path, "texas", "texas100_split.npz"))


def test_purchase_label_column_then_features(tmp_path):
    rng = rng_for(8)
    table = np.concatenate([rng.integers(1, 101, (10, 1)), rng.integers(0, 2, (10, 600))], axis=1)
    os.makedirs(os.path.join(tmp_path, "purchase100"))
    np.savetxt(os.path.join(tmp_path, "purchase100", "purchase100.txt"), table, fmt="%d", delimiter=",")
    train, test = get_dataset("purchase100", root=tmp_path)
    want_train, _ = train_test_split(range(10), test_size=0.2, random_state=0)
    assert train.x.shape == (8, 600) and len(test) == 2
    assert np.array_equal(train.x.numpy(), table[want_train, 1:])
    assert train.y.tolist() == (table[want_train, 0] - 1).tolist()


def test_digits_needs_no_files(tmp_path):
    train, test = get_dataset("digits", root=tmp_path)
    assert len(train) == 539 and len(test) == 1258 and train.x.shape[1] == 64  # digits: a 30/70 split
    assert train.x.dtype == torch.float32 and train.x.min() == 0 and train.x.max() == 1
    assert set(test.y.tolist()) == set(range(10))
    with np.load(os.path.join(tmp_path, "digits", "digits_split.npz")) as f:
        want_train, _ = train_test_split(range(1797), test_size=0.7, random_state=0)
        assert f["train"].tolist() == want_train and int(f["n"]) == 1797


def test_a_cached_split_of_another_test_share_is_refused(tmp_path):
    """A digits split cached before digits moved to 30/70 (80/20, 360 test rows) is not silently reused."""
    folder = tmp_path / "digits"
    folder.mkdir()
    train, test = train_test_split(range(1797), test_size=0.2, random_state=0)
    np.savez(folder / "digits_split.npz", train=np.asarray(train), test=np.asarray(test), n=np.int64(1797))
    with pytest.raises(MissingError) as err:
        get_dataset("digits", root=tmp_path)
    assert str(err.value) == (
        f"cached split {folder / 'digits_split.npz'} holds 360 of 1797 rows for test but digits uses a 70% test "
        f"share (1258 rows); delete it (and the runs made on it) to make a new split"
    )
    assert split_source("digits", root=tmp_path) == "seeded 30/70 split (random_state 0)"
    assert split_source("location", root=tmp_path) == "seeded 80/20 split (random_state 0)"


@pytest.mark.parametrize(
    "name,path",
    [
        ("location", "location/data_complete.npz"),
        ("texas100", "texas/labels.txt"),
        ("purchase100", "purchase100/purchase100.txt"),
    ],
)
def test_missing_tabular_file_names_path_and_source(tmp_path, name, path):
    with pytest.raises(MissingError) as err:
        get_dataset(name, root=tmp_path)
    message = str(err.value)
    assert os.path.join(str(tmp_path), *path.split("/")) in message and "https://" in message and "\n" not in message


def test_missing_texas_feats(tmp_path):
    write_texas(tmp_path, n=3)
    os.remove(os.path.join(tmp_path, "texas", "feats.txt"))
    with pytest.raises(MissingError, match="feats.txt not found; unpack texas/100/feats"):
        get_dataset("texas100", root=tmp_path)


def test_malformed_tabular_files(tmp_path):
    write_texas(tmp_path, n=5, features=6000)
    with pytest.raises(MissingError, match="feats.txt has 6000 columns, expected 6169"):
        get_dataset("texas100", root=tmp_path)
    write_texas(tmp_path, n=5, labels=np.array([1, 2, 3, 4]))
    with pytest.raises(MissingError, match="labels.txt: 4 labels for 5 feature rows"):
        get_dataset("texas100", root=tmp_path)
    with open(os.path.join(tmp_path, "texas", "labels.txt"), "w") as f:
        f.write("1\n2\nabc\n4\n5\n")
    with pytest.raises(MissingError, match="not a comma-separated numeric table .*could not convert string"):
        get_dataset("texas100", root=tmp_path)

    write_location(tmp_path, y=np.array([0] + [1] * 19))
    with pytest.raises(MissingError, match=r"labels must be integers 1\.\.30, found 0 \(row 1\)"):
        get_dataset("location", root=tmp_path)
    np.savez(os.path.join(tmp_path, "location", "data_complete.npz"), x=np.zeros((4, 446)), y=np.ones(3))
    with pytest.raises(MissingError, match="3 labels for 4 feature rows"):
        get_dataset("location", root=tmp_path)
    np.savez(os.path.join(tmp_path, "location", "data_complete.npz"), features=np.zeros((4, 446)))
    with pytest.raises(MissingError, match="not an npz with arrays x and y"):
        get_dataset("location", root=tmp_path)

    os.makedirs(os.path.join(tmp_path, "purchase100"))
    with open(os.path.join(tmp_path, "purchase100", "purchase100.txt"), "w") as f:
        f.write("1," + ",".join(["0"] * 600) + "\n2," + ",".join(["1"] * 599) + "\n")
    with pytest.raises(MissingError, match=r"empty or missing values \(row 2\)"):
        get_dataset("purchase100", root=tmp_path)

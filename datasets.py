"""The seven datasets as in-memory tensors: get_dataset(name) -> (train, test) TensorData.

Images stay uint8 and are normalised per batch; tabular features are float32. Everything
derived from the raw files (tabular splits, the CINIC subset, decoded CINIC images) is cached
next to the data in non-pickle .npz/.npy files.
"""

import math
import os
import pickle
import zipfile

import numpy as np
import pandas as pd
import torch
from sklearn.model_selection import train_test_split

import paths
from common import MissingError, UsageError, atomic_write

DATASETS = {
    "cifar10": (10, 3),
    "cifar100": (100, 3),
    "cinic": (10, 3),
    "location": (30, 446),
    "texas100": (100, 6169),
    "purchase100": (100, 600),
    "digits": (10, 64),
}  # name -> (num_cls, input_dim)
TABULAR_SPLIT_SEED = 0  # random_state of the tabular train/test split (the release left it unseeded)
# Test share of the tabular train/test split: the release's 20%, except digits (ours), whose 30/70 split leaves
# each model about 24 training samples a class. With 80/20 (about 65 a class) digits is so easy (96% test
# accuracy) that no attack reached an AUC of 0.60 on the pruned Base model; see docs/datasets.md.
TEST_SHARE = {"digits": 0.7}
CINIC_SUBSET_SEED = 0  # only used when the authors' train_test_idx.pkl is absent
CINIC_SUBSET_SIZES = (90000, 31499)

MEAN_STD = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
    "cinic": ((0.47889522, 0.47227842, 0.43047404), (0.24205776, 0.23828046, 0.25874835)),
}
FOLDERS = {
    "cifar10": "cifar10-data",
    "cifar100": "cifar100-data",
    "cinic": "cinic",
    "location": "location",
    "texas100": "texas",
    "purchase100": "purchase100",
    "digits": "digits",
}
SOURCES = {  # how to get each download-only dataset into its folder (links from the release README)
    "cifar10": "extract https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz into {folder}",
    "cifar100": "extract https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz into {folder}",
    "cinic": "download https://datashare.ed.ac.uk/bitstream/handle/10283/3192/CINIC-10.tar.gz, "
    "unpack it and put its train/ and test/ folders into {folder}",
    "location": "download data_complete.npz from https://github.com/jjy1994/MemGuard/tree/master/data/location "
    "into {folder}",
    "texas100": "unpack texas/100/feats and texas/100/labels of "
    "https://www.comp.nus.edu.sg/~reza/files/dataset_texas.tgz into {folder} as feats.txt and labels.txt",
    "purchase100": "unpack dataset_purchase of https://www.comp.nus.edu.sg/~reza/files/dataset_purchase.tgz "
    "into {folder} as purchase100.txt",
}


class TensorData:
    """A whole dataset held in memory. x: uint8 images (N,3,32,32) or float32 features (N,D); y: int64 labels from 0.
    mean/std: per-channel float tensors for images (normalised at batch time: x/255 then (x-mean)/std, which equals
    torchvision ToTensor+Normalize), None for tabular data."""

    def __init__(self, x, y, mean=None, std=None, amp=False):
        if len(x) != len(y):
            raise ValueError(f"x has {len(x)} rows but y has {len(y)}")
        self.x, self.y = x, y
        self.amp = amp  # --amp: forward passes on these batches run under bfloat16 autocast (CUDA only)
        self.mean = None if mean is None else torch.as_tensor(mean, dtype=torch.float32, device=x.device)
        self.std = None if std is None else torch.as_tensor(std, dtype=torch.float32, device=x.device)

    def __len__(self):
        return len(self.y)

    def to(self, device: torch.device, amp: bool = None) -> "TensorData":
        """A copy on device; amp=None keeps this one's --amp choice."""
        return TensorData(self.x.to(device), self.y.to(device), self.mean, self.std, self.amp if amp is None else amp)

    def batch(self, idx: torch.Tensor) -> tuple:
        x = self.x[idx]
        if self.mean is not None:
            # the same operations, in the same order, as ToTensor (div 255) then Normalize (sub, div)
            x = x.float().div_(255).sub_(self.mean.view(-1, 1, 1)).div_(self.std.view(-1, 1, 1))
        return x, self.y[idx]

    @staticmethod
    def concat(first: "TensorData", second: "TensorData") -> "TensorData":
        same_norm = (first.mean is None and second.mean is None) or (
            first.mean is not None
            and second.mean is not None
            and torch.equal(first.mean, second.mean)
            and torch.equal(first.std, second.std)
        )
        if not same_norm or first.x.dtype != second.x.dtype or first.x.shape[1:] != second.x.shape[1:]:
            raise ValueError("cannot concatenate datasets of different kinds")
        return TensorData(torch.cat([first.x, second.x]), torch.cat([first.y, second.y]), first.mean, first.std)


def get_dataset(name: str, root: str = None) -> tuple:
    """(train, test) TensorData for one of DATASETS, read from root (default: the repo's data/datasets/,
    paths.DATA_ROOT, looked up at the call)."""
    if name not in DATASETS:
        raise UsageError(f"unknown dataset '{name}'; valid names: {', '.join(DATASETS)}")
    root = paths.DATA_ROOT if root is None else root
    folder = os.path.join(root, FOLDERS[name])
    if name in ("cifar10", "cifar100"):
        return _cifar(name, folder)
    if name == "cinic":
        return _cinic(folder)
    x, y = TABULAR_READERS[name](folder)
    train, test = (torch.from_numpy(i) for i in tabular_split(len(y), folder, name))
    return TensorData(x[train], y[train]), TensorData(x[test], y[test])


def authors_split_file(name: str, folder: str) -> str:
    """The authors' split file in a dataset's folder, which get_dataset prefers when present: CINIC's
    train_test_idx.pkl, or <name>.pkl (a pair of torch Subsets) for the tabular datasets."""
    return os.path.join(folder, "train_test_idx.pkl" if name == "cinic" else f"{name}.pkl")


def split_source(name: str, root: str = None) -> str:
    """Where get_dataset(name, root) takes its training set from, in words (recorded with mem-scores)."""
    root = paths.DATA_ROOT if root is None else root
    if name in ("cifar10", "cifar100"):
        return "official training set order"
    authors = authors_split_file(name, os.path.join(root, FOLDERS[name]))
    if os.path.isfile(authors):
        return f"authors' {os.path.basename(authors)}"
    if name == "cinic":
        return f"drawn subset (seed {CINIC_SUBSET_SEED})"
    train_share = round(100 * (1 - tabular_test_share(name)))
    return f"seeded {train_share}/{100 - train_share} split (random_state {TABULAR_SPLIT_SEED})"


def _how(name, folder):
    return SOURCES[name].format(folder=folder)


def _one_line(err):
    return " ".join(str(err).split())


# ---------------------------------------------------------------- trusted pickles from the release

_SAFE_GLOBALS = {
    "builtins": {
        "list",
        "dict",
        "set",
        "frozenset",
        "tuple",
        "int",
        "float",
        "complex",
        "bool",
        "str",
        "bytes",
        "bytearray",
        "range",
        "slice",
        "object",
    },
    "collections": {"OrderedDict", "defaultdict", "deque"},
    "_codecs": {"encode"},  # how protocol-2 pickles store bytes
}
_SAFE_NUMPY = {"_reconstruct", "ndarray", "dtype", "scalar"}


class _Stub:
    """Stands in for a class outside builtins/numpy/collections: keeps its arguments and state, runs nothing."""

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):
            state = {**(state[0] or {}), **state[1]}  # the (dict, slots) form
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.state = state


class _TrustedUnpickler(pickle.Unpickler):
    """Real classes only for plain data; any other class becomes an inert _Stub subclass named like it."""

    def find_class(self, module, name):
        if name in _SAFE_GLOBALS.get(module, ()) or (module.split(".")[0] == "numpy" and name in _SAFE_NUMPY):
            return super().find_class(module, name)
        return type(name, (_Stub,), {"origin": f"{module}.{name}"})

    def persistent_load(self, pid):  # torch.save files point at tensor storages this way
        return _Stub(pid)


def _unpickle(path, encoding="ASCII"):
    """Every object pickled in a file (or the one in a torch.save zip), through _TrustedUnpickler."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.endswith("data.pkl")]
            if not names:
                raise pickle.UnpicklingError("zip file without data.pkl")
            with archive.open(names[0]) as f:
                return [_TrustedUnpickler(f, encoding=encoding).load()]
    objects = []
    with open(path, "rb") as f:
        while f.peek(1):
            objects.append(_TrustedUnpickler(f, encoding=encoding).load())
    return objects


def _unpickle_pair(path):
    """The two objects of a trusted pickle: one pickled pair, or two objects pickled one after the other."""
    try:
        objects = _unpickle(path)
    except Exception as err:
        raise MissingError(
            f"{path} could not be unpickled ({type(err).__name__}: {_one_line(err)}); "
            f"delete it or replace it with the authors' file"
        )
    if len(objects) == 1 and isinstance(objects[0], (tuple, list)) and len(objects[0]) == 2:
        return objects[0]
    if len(objects) == 2:
        return objects
    raise MissingError(f"{path} does not hold a (train, test) pair; delete it or replace it with the authors' file")


def read_authors_tabular_split(path: str, n: int) -> tuple:
    """Train and test indices from the release's <name>.pkl, a pickle of two torch Subset objects.

    This unpickles a file you must trust (the authors' published split). It goes through a restricted
    unpickler that builds only plain data and inert stand-ins, but a pickle from a stranger is never
    safe to load. Only the Subsets' .indices are used.
    """
    train, test = _unpickle_pair(path)
    for subset in (train, test):
        if not hasattr(subset, "indices"):
            found = getattr(subset, "origin", type(subset).__name__)
            raise MissingError(
                f"{path} should hold two torch Subset objects, found {found}; delete it to use our own split"
            )
    return _indices(train.indices, n, path), _indices(test.indices, n, path)


def read_authors_cinic_indices(path: str, n_train: int, n_test: int) -> tuple:
    """Train and test indices from the release's cinic/train_test_idx.pkl, a pickle of two int lists.

    This unpickles a file you must trust (the authors' published subset). It goes through a restricted
    unpickler that builds only plain data and inert stand-ins, but a pickle from a stranger is never
    safe to load.
    """
    train, test = _unpickle_pair(path)
    return _indices(train, n_train, path), _indices(test, n_test, path)


def _indices(values, n, path):
    array = np.asarray(values) if isinstance(values, (list, tuple, np.ndarray)) else None
    if array is None or array.ndim != 1 or array.dtype.kind not in "iu":
        raise MissingError(f"{path} should hold lists of integer indices; delete it")
    if len(array) and (array.min() < 0 or array.max() >= n):
        raise MissingError(
            f"{path} has indices outside 0..{n - 1}, so it does not fit the data next to it; delete it or fix the data"
        )
    return array.astype(np.int64)


# ---------------------------------------------------------------- cached index files


def _load_npz(path, keys):
    try:
        with np.load(path, allow_pickle=False) as f:
            return [f[k] for k in keys]
    except Exception as err:
        raise MissingError(
            f"cached file {path} is unreadable ({type(err).__name__}: {_one_line(err)}); delete it and rerun"
        )


def _save_npz(path, **arrays):
    atomic_write(path, lambda f: np.savez(f, **arrays))


def tabular_test_share(name: str) -> float:
    """The test share of a tabular dataset's own train/test split (TEST_SHARE, else the release's 0.2)."""
    return TEST_SHARE.get(name, 0.2)


def tabular_split(n: int, folder: str, name: str) -> tuple:
    """Train/test indices (tabular_test_share(name) of the rows for test): the authors' <name>.pkl if
    present, else ours, made once and cached."""
    authors = authors_split_file(name, folder)
    if os.path.isfile(authors):
        return read_authors_tabular_split(authors, n)
    path = os.path.join(folder, f"{name}_split.npz")
    if os.path.isfile(path):
        train, test, cached_n = _load_npz(path, ("train", "test", "n"))
        if int(cached_n) != n:
            raise MissingError(
                f"cached split {path} was made for {int(cached_n)} rows but the data has {n}; "
                f"delete it to make a new split"
            )
        share = tabular_test_share(name)
        if len(test) != math.ceil(share * n):  # train_test_split's own rounding
            raise MissingError(
                f"cached split {path} holds {len(test)} of {n} rows for test but {name} uses a {share:.0%} test "
                f"share ({math.ceil(share * n)} rows); delete it (and the runs made on it) to make a new split"
            )
        return _indices(train, n, path), _indices(test, n, path)
    train, test = train_test_split(range(n), test_size=tabular_test_share(name), random_state=TABULAR_SPLIT_SEED)
    train, test = np.asarray(train, dtype=np.int64), np.asarray(test, dtype=np.int64)
    _save_npz(path, train=train, test=test, n=np.int64(n))
    return train, test


# ---------------------------------------------------------------- tabular readers


def _require(path, name):
    if not os.path.isfile(path):
        raise MissingError(f"{path} not found; {_how(name, os.path.dirname(path))}")


def _read_csv(path, name, columns):
    """A comma-separated numeric file as a float32 array with exactly `columns` columns."""
    _require(path, name)
    fix = f"get a fresh copy: {_how(name, os.path.dirname(path))}"
    try:
        table = pd.read_csv(path, header=None, dtype=np.float32).to_numpy()
    except ValueError as err:  # non-numeric values, ragged rows, empty file
        raise MissingError(f"{path} is not a comma-separated numeric table ({_one_line(err)}); {fix}")
    if table.shape[1] != columns:
        raise MissingError(f"{path} has {table.shape[1]} columns, expected {columns}; {fix}")
    empty = np.isnan(table).any(axis=1)
    if empty.any():
        raise MissingError(f"{path} has empty or missing values (row {int(empty.argmax()) + 1}); {fix}")
    return table


def _labels(y, n, path, name):
    """Labels 1..num_cls, as in the raw files, -> int64 0..num_cls-1, checked."""
    num_cls, fix = DATASETS[name][0], f"get a fresh copy: {_how(name, os.path.dirname(path))}"
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1 or y.dtype.kind not in "biuf":
        raise MissingError(f"{path}: labels should be a list of numbers, got {y.dtype} {y.shape}; {fix}")
    if len(y) != n:
        raise MissingError(f"{path}: {len(y)} labels for {n} feature rows; {fix}")
    bad = (y != np.round(y)) | (y < 1) | (y > num_cls)
    if bad.any():
        row = int(bad.argmax())
        raise MissingError(f"{path}: labels must be integers 1..{num_cls}, found {y[row]} (row {row + 1}); {fix}")
    return torch.from_numpy(y.astype(np.int64) - 1)


def _location(folder):
    path = os.path.join(folder, "data_complete.npz")
    _require(path, "location")
    fix = f"get a fresh copy: {_how('location', folder)}"
    try:
        with np.load(path, allow_pickle=False) as f:
            x, y = f["x"], f["y"]
    except Exception as err:  # not an npz, a missing key, object arrays
        raise MissingError(f"{path} is not an npz with arrays x and y ({_one_line(err)}); {fix}")
    dim = DATASETS["location"][1]
    if x.ndim != 2 or x.shape[1] != dim or x.dtype.kind not in "biuf" or np.isnan(x).any():
        raise MissingError(
            f"{path}: x should be a numeric ({len(x)}, {dim}) array without NaN, got {x.dtype} {x.shape}; {fix}"
        )
    return torch.from_numpy(x.astype(np.float32)), _labels(y, len(x), path, "location")


def _texas(folder):
    feats, labels = os.path.join(folder, "feats.txt"), os.path.join(folder, "labels.txt")
    _require(labels, "texas100")  # before the long read of feats.txt
    x = _read_csv(feats, "texas100", DATASETS["texas100"][1])
    return torch.from_numpy(x), _labels(_read_csv(labels, "texas100", 1), len(x), labels, "texas100")


def _purchase(folder):
    path = os.path.join(folder, "purchase100.txt")
    table = _read_csv(path, "purchase100", 1 + DATASETS["purchase100"][1])
    return torch.from_numpy(np.ascontiguousarray(table[:, 1:])), _labels(table[:, 0], len(table), path, "purchase100")


def _digits(folder):
    from sklearn.datasets import load_digits

    data = load_digits()
    return torch.from_numpy((data.data / 16).astype(np.float32)), torch.from_numpy(data.target.astype(np.int64))


TABULAR_READERS = {"location": _location, "texas100": _texas, "purchase100": _purchase, "digits": _digits}


# ---------------------------------------------------------------- CIFAR


def _cifar(name, folder):
    inner, train_files, test_files, label_key = {
        "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels"),
        "cifar100": ("cifar-100-python", ["train"], ["test"], b"fine_labels"),
    }[name]
    batches = os.path.join(folder, inner)
    if not os.path.isdir(batches):
        _download_cifar(name, folder)
        if not os.path.isdir(batches):
            raise MissingError(f"{batches} is still missing after the download; {_how(name, folder)}")
    mean, std = MEAN_STD[name]
    train = _read_cifar_batches([os.path.join(batches, f) for f in train_files], label_key, name)
    test = _read_cifar_batches([os.path.join(batches, f) for f in test_files], label_key, name)
    return TensorData(*train, mean, std), TensorData(*test, mean, std)


def _download_cifar(name, folder):
    import torchvision

    dataset = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    try:
        dataset(root=folder, train=True, download=True)  # fetches and extracts the whole archive
    except Exception as err:  # no network, a bad archive
        raise MissingError(
            f"could not download {name} into {folder} ({type(err).__name__}: {_one_line(err)}); {_how(name, folder)}"
        )


def _read_cifar_batches(files, label_key, name):
    """The official python-version batch files (pickled dicts) -> uint8 (N,3,32,32), int64 labels."""
    batches = os.path.dirname(files[0])
    fix = f"delete {batches} and rerun to download it again, or {_how(name, os.path.dirname(batches))}"
    xs, ys = [], []
    for path in files:
        if not os.path.isfile(path):
            raise MissingError(f"CIFAR batch file {path} not found; {fix}")
        try:
            [batch] = _unpickle(path, encoding="bytes")
            data, labels = np.asarray(batch[b"data"]), np.asarray(batch[label_key])
        except Exception as err:
            raise MissingError(
                f"CIFAR batch file {path} is not a pickled dict with b'data' and {label_key!r} "
                f"({type(err).__name__}); {fix}"
            )
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or labels.shape != (len(data),):
            raise MissingError(
                f"CIFAR batch file {path} has data {data.dtype} {data.shape} and {labels.shape} labels, "
                f"expected uint8 (N, 3072) and N labels; {fix}"
            )
        if labels.dtype.kind not in "iu" or labels.min(initial=0) < 0 or labels.max(initial=0) >= DATASETS[name][0]:
            raise MissingError(f"CIFAR batch file {path} has labels outside 0..{DATASETS[name][0] - 1}; {fix}")
        xs.append(data.reshape(-1, 3, 32, 32))
        ys.append(labels.astype(np.int64))
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))


# ---------------------------------------------------------------- CINIC


def _cinic(folder):
    train_x, train_y = _image_folder(os.path.join(folder, "train"))
    test_x, test_y = _image_folder(os.path.join(folder, "test"))
    train, test = _cinic_subset(folder, len(train_y), len(test_y))
    mean, std = MEAN_STD["cinic"]
    return TensorData(train_x[train], train_y[train], mean, std), TensorData(test_x[test], test_y[test], mean, std)


def _cinic_subset(folder, n_train, n_test):
    """The authors' train_test_idx.pkl if present, else a seeded subset drawn once and cached in an .npz."""
    authors = authors_split_file("cinic", folder)
    path = os.path.join(folder, "train_test_idx.npz")
    if os.path.isfile(authors):
        train, test = read_authors_cinic_indices(authors, n_train, n_test)
    elif os.path.isfile(path):
        train, test, sizes = _load_npz(path, ("train", "test", "folder_sizes"))
        if tuple(sizes.tolist()) != (n_train, n_test):
            raise MissingError(
                f"cached subset {path} was drawn from {tuple(sizes.tolist())} train/test images "
                f"but the folders now hold {(n_train, n_test)}; delete it to draw a new subset"
            )
        train, test = _indices(train, n_train, path), _indices(test, n_test, path)
    else:
        rng = np.random.default_rng(CINIC_SUBSET_SEED)
        train, test = (
            np.sort(rng.choice(n, min(n, size), replace=False)).astype(np.int64)
            for n, size in zip((n_train, n_test), CINIC_SUBSET_SIZES)
        )
        _save_npz(path, train=train, test=test, folder_sizes=np.array([n_train, n_test], dtype=np.int64))
    return torch.from_numpy(train), torch.from_numpy(test)


def _image_folder(directory):
    """All images of an ImageFolder-style directory, in ImageFolder order, decoded once and cached as .npy."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    fix = _how("cinic", os.path.dirname(directory))
    if not os.path.isdir(directory):
        raise MissingError(f"CINIC folder {directory} not found; {fix}")
    try:
        samples = make_dataset(directory, find_classes(directory)[1], extensions=IMG_EXTENSIONS)
    except FileNotFoundError as err:  # no class folders, or a class folder without images
        raise MissingError(f"CINIC folder {directory} is incomplete ({_one_line(err)}); {fix}")
    x_path, y_path = directory + "_images.npy", directory + "_labels.npy"
    cached = _load_decoded(x_path, y_path, len(samples))
    if cached is not None:
        return cached
    print(f"Decoding the {len(samples)} images of {directory} once; cached in {x_path}")
    x = np.empty((len(samples), 3, 32, 32), dtype=np.uint8)
    for i, (path, _) in enumerate(samples):
        x[i] = _decode_image(path)
    y = np.array([label for _, label in samples], dtype=np.int64)
    atomic_write(y_path, lambda f: np.save(f, y))
    atomic_write(x_path, lambda f: np.save(f, x))
    return torch.from_numpy(x), torch.from_numpy(y)


def _load_decoded(x_path, y_path, count):
    """Cached decoded images, or None when absent, unreadable or not matching the folder's file count."""
    try:
        x, y = np.load(x_path, allow_pickle=False), np.load(y_path, allow_pickle=False)
    except Exception:
        return None
    if x.shape != (count, 3, 32, 32) or x.dtype != np.uint8 or y.shape != (count,) or y.dtype != np.int64:
        return None
    return torch.from_numpy(x), torch.from_numpy(y)


def _decode_image(path):
    from PIL import Image

    try:
        with Image.open(path) as img:
            rgb = np.asarray(img.convert("RGB"))  # what ImageFolder's default loader does
    except Exception as err:
        raise MissingError(f"image {path} cannot be decoded ({type(err).__name__}); download CINIC again")
    if rgb.shape != (32, 32, 3):
        raise MissingError(f"image {path} is {rgb.shape[1]}x{rgb.shape[0]}, expected 32x32; download CINIC again")
    return rgb.transpose(2, 0, 1)

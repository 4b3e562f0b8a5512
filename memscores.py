"""Per-sample mem-scores of a config's training set (docs/defenses.md#mem-scores): the authors' CSV format and
the fingerprint that ties a CSV to the training set it scores.

Row i of memscore/memscore_<ds>_<model>.csv (in the repo's memscore/, whatever the working directory)
scores training-set sample i, so the file only means something for the split it was made on.
compute_memscore.py writes a sidecar next to it,
memscore/memscore_<ds>_<model>.json, holding:
  dataset, model, n_train  what the scores were computed for
  split                    where that training set came from, in words (datasets.split_source), e.g.
                           "seeded 80/20 split (random_state 0)" or "authors' location.pkl"
  train_sha256             SHA-256 of the training set in row order (train_sha256 below): any other
                           split, order or data gives another value
  csv_sha256               SHA-256 of the CSV's bytes: a CSV and a sidecar that were not written
                           together (an interrupted --force, an edited file) do not pass as a pair
The sidecar is written before the CSV, so that a kill in between leaves a pair that fails csv_sha256,
never a new CSV without its sidecar. A CSV without a sidecar is taken only as the authors' published
file, recognised by its SHA-256 in memscore/authors-files.sha256 (shipped with the repo, in
`sha256sum` format: the release's memscore/*.csv and CINIC's train_test_idx.pkl), and for location and
cinic only while the authors' split file is in use (for cinic: the listed train_test_idx.pkl).
"""

import hashlib
import io
import json
import os

import numpy as np
import pandas as pd
import torch

import paths
from common import MissingError, atomic_write
from datasets import FOLDERS, authors_split_file, split_source
from paths import memscore_path

AUTHORS_MEMSCORES = {
    (ds, model) for ds in ("cifar10", "cifar100", "cinic") for model in ("resnet18", "densenet121", "vgg16bn")
} | {("location", "columnfc")}
AUTHORS_HASHES = os.path.join(paths.REPO_DIR, "memscore", "authors-files.sha256")  # ships with the code
SIDECAR_KEYS = {"dataset": str, "model": str, "n_train": int, "split": str, "train_sha256": str, "csv_sha256": str}
HASH_CHUNK = 64 << 20  # bytes of x moved to the CPU and hashed at a time


def memscore_fix(args) -> str:
    """How to get the mem-score file of this config: the authors' CSV where one exists, else compute it."""
    compute = f"compute it with python compute_memscore.py {args.gpu_id} {args.config_path} (docs/defenses.md)"
    if (args.dataset_name, args.model_name) in AUTHORS_MEMSCORES:
        return f"put the authors' published CSV there, or {compute}"
    return compute


def recompute_hint(args) -> str:
    return f"python compute_memscore.py {args.gpu_id} {args.config_path} --force"


def sidecar_path(path: str) -> str:
    """memscore/memscore_<ds>_<model>.csv -> memscore/memscore_<ds>_<model>.json"""
    return os.path.splitext(path)[0] + ".json"


def train_sha256(x: torch.Tensor, y: torch.Tensor) -> str:
    """SHA-256 (hex) of a training set in row order: the text "<shape of x> <dtype of x>\\n", the labels
    as little-endian int64, then x's raw bytes as stored (uint8 images, float32 features), row by row.
    Cheap next to loading the data (about 1 s per GB); x and y may sit on any device."""
    x = x.detach()
    digest = hashlib.sha256(f"{tuple(x.shape)} {str(x.dtype).removeprefix('torch.')}\n".encode())
    digest.update(y.detach().cpu().to(torch.int64).numpy().astype("<i8").tobytes())
    rows = max(1, HASH_CHUNK // max(1, x[0].numel() * x.element_size())) if len(x) else 1
    for start in range(0, len(x), rows):
        digest.update(np.ascontiguousarray(x[start : start + rows].cpu().numpy()).view(np.uint8))
    return digest.hexdigest()


def fingerprint(dataset_name: str, model_name: str, x: torch.Tensor, y: torch.Tensor, source: str) -> dict:
    """What a sidecar says about the training set (x, y) whose scores it describes (csv_sha256 aside)."""
    return {
        "dataset": dataset_name,
        "model": model_name,
        "n_train": len(y),
        "split": source,
        "train_sha256": train_sha256(x, y),
    }


def write_sidecar(path: str, csv_bytes: bytes, fields: dict) -> None:
    """The sidecar of the CSV `path` whose content is csv_bytes (atomically); fields from fingerprint()."""
    record = {**fields, "csv_sha256": hashlib.sha256(csv_bytes).hexdigest()}
    text = json.dumps(record, indent=2) + "\n"
    atomic_write(sidecar_path(path), lambda f: f.write(text.encode()))


def write_with_sidecar(path: str, csv_bytes: bytes, fields: dict) -> None:
    """Sidecar first, then the CSV, each atomically (see the module docstring for why in this order)."""
    write_sidecar(path, csv_bytes, fields)
    atomic_write(path, lambda f: f.write(csv_bytes))


def read_sidecar(path: str, recompute: str) -> dict:
    try:
        with open(path) as f:
            record = json.load(f)
        ok = isinstance(record, dict) and all(isinstance(record.get(k), t) for k, t in SIDECAR_KEYS.items())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        ok = False
    if not ok:
        raise MissingError(
            f"mem-score fingerprint {path} is unreadable or lacks one of {', '.join(SIDECAR_KEYS)}; "
            f"recompute the scores with {recompute}"
        )
    return record


def _describe(record: dict) -> str:
    return (
        f"{record['dataset']} [{record['split']}, {record['n_train']} samples, "
        f"train_sha256 {record['train_sha256'][:12]}]"
    )


def _way_back(record: dict, dataset_name: str, source: str) -> str:
    """How to get back the training set the scores were made for; None for another dataset's scores."""
    if record["dataset"] != dataset_name:
        return None
    folder = os.path.join(paths.DATA_ROOT, FOLDERS[dataset_name])
    authors = os.path.basename(authors_split_file(dataset_name, folder))
    if record["split"] == f"authors' {authors}" != source:
        return f"put {authors} back into {folder}/"
    if source == f"authors' {authors}" != record["split"]:
        return f"move {authors} out of {folder}/"
    return f"restore the files in {folder}/ they were made with"


def check_fingerprint(args, path: str, csv_bytes: bytes, x: torch.Tensor, y: torch.Tensor, source: str) -> None:
    """The sidecar of `path` describes this CSV and this training set (x, y), or a one-line MissingError."""
    recompute, sidecar = recompute_hint(args), sidecar_path(path)
    record = read_sidecar(sidecar, recompute)
    if record["csv_sha256"] != hashlib.sha256(csv_bytes).hexdigest():
        raise MissingError(
            f"mem-scores {path} and their fingerprint {sidecar} were not written together "
            f"(an interrupted compute_memscore.py or an edited file); recompute them with {recompute}"
        )
    ours = fingerprint(args.dataset_name, args.model_name, x, y, source)
    if any(record[k] != ours[k] for k in ("dataset", "n_train", "train_sha256")):
        fix = f"recompute them for this split with {recompute}"
        way_back = _way_back(record, args.dataset_name, source)
        raise MissingError(
            f"mem-scores {path} score another training set: they were made for {_describe(record)}, "
            f"this run trains on {_describe(ours)}; {f'{way_back}, or {fix}' if way_back else fix}"
        )


def read_hash_list(path: str = None) -> dict:
    """{file named relative to the repo: SHA-256 hex} from a `sha256sum` list (AUTHORS_HASHES by default);
    '#' lines are comments."""
    path = AUTHORS_HASHES if path is None else path
    listed = {}
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip() or line.startswith("#"):
                continue
            digest, _, name = line.rstrip("\n").partition("  ")
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest) or not name:
                raise MissingError(f"{path} line {number} is not '<sha256>  <file>'; restore it from the repo")
            listed[name] = digest
    return listed


def authors_file(name: str, content: bytes) -> bool:
    """Whether content is the authors' file `name` (relative to the repo, e.g. memscore/memscore_cifar10_resnet18.csv)
    as AUTHORS_HASHES lists it."""
    listed = read_hash_list().get(name)
    return listed is not None and hashlib.sha256(content).hexdigest() == listed


def check_unsigned(args, path: str, source: str, csv_bytes: bytes) -> None:
    """A CSV without sidecar passes only as the authors' published file (by its hash) on the authors' split."""
    recompute, sidecar = recompute_hint(args), sidecar_path(path)
    if (args.dataset_name, args.model_name) not in AUTHORS_MEMSCORES:
        raise MissingError(
            f"mem-scores {path} carry no fingerprint ({sidecar}) and the authors publish none for "
            f"{args.dataset_name}_{args.model_name}, so nothing says which training set they score; "
            f"recompute them with {recompute} (it writes the fingerprint)"
        )
    if not authors_file(f"memscore/{os.path.basename(path)}", csv_bytes):
        digest = hashlib.sha256(csv_bytes).hexdigest()
        raise MissingError(
            f"mem-scores {path} carry no fingerprint ({sidecar}) and are not the authors' published "
            f"file (SHA-256 {digest[:12]}... is not the one memscore/authors-files.sha256 lists for "
            f"it); put the authors' CSV there, or recompute them with {recompute} (it writes the "
            f"fingerprint)"
        )
    if args.dataset_name in ("location", "cinic"):
        folder = os.path.join(paths.DATA_ROOT, FOLDERS[args.dataset_name])
        split_file = authors_split_file(args.dataset_name, folder)
        authors = os.path.basename(split_file)
        if source != f"authors' {authors}":
            raise MissingError(
                f"mem-scores {path} carry no fingerprint and look like the authors' published file, "
                f"which scores the authors' split ({authors}); put {authors} into {folder}/ "
                f"or compute scores for this split with {recompute}"
            )
        listed_name = f"data/datasets/{FOLDERS[args.dataset_name]}/{authors}"  # cinic's; location.pkl is not listed
        if listed_name in read_hash_list():
            with open(split_file, "rb") as f:
                if not authors_file(listed_name, f.read()):
                    raise MissingError(
                        f"mem-scores {path} are the authors' published file, which scores the authors' "
                        f"split, but {split_file} is not the authors' {authors} (its SHA-256 is not the "
                        f"one memscore/authors-files.sha256 lists); put the authors' {authors} there "
                        f"or compute scores for this split with {recompute}"
                    )


def read_memscores(path: str, n_train: int, fix: str, csv_bytes: bytes = None) -> torch.Tensor:
    """The authors' CSV (unnamed index column 0..n-1, one column named 0) -> float64 tensor, row i = trainset
    index i. csv_bytes: the file's content when already read."""
    try:
        frame = pd.read_csv(path if csv_bytes is None else io.BytesIO(csv_bytes), index_col=0)
    except Exception as err:  # missing, empty, not a CSV
        raise MissingError(f"mem-scores {path} is not a readable CSV ({type(err).__name__}); {fix}")
    if (
        list(frame.columns) != ["0"]
        or not pd.api.types.is_numeric_dtype(frame["0"])
        or pd.api.types.is_bool_dtype(frame["0"])
    ):  # True/False would read as 1/0
        raise MissingError(f"mem-scores {path} must hold an index column and one numeric column named 0; {fix}")
    if len(frame) != n_train:
        raise MissingError(
            f"mem-scores {path} has {len(frame)} rows but the training set has {n_train} samples "
            f"(made for another dataset or split); {fix}"
        )
    if not np.array_equal(frame.index.to_numpy(), np.arange(n_train)):
        raise MissingError(f"mem-scores {path}: the index column must count 0..{n_train - 1} in order; {fix}")
    scores = frame["0"].to_numpy(np.float64)
    if not np.isfinite(scores).all():
        raise MissingError(f"mem-scores {path}: row {int(np.argmin(np.isfinite(scores)))} is not a number; {fix}")
    outside = np.flatnonzero(np.abs(scores) > 1)  # P(correct | in) - P(correct | out) lies in [-1, 1]
    if len(outside):
        raise MissingError(
            f"mem-scores {path}: row {outside[0]} holds {scores[outside[0]]:g}, outside [-1, 1] "
            f"(a mem-score is a difference of two probabilities; scaled or other scores?); {fix}"
        )
    return torch.tensor(scores)


def load_memscores(args, data, n_train: int = None) -> torch.Tensor:
    """Mem-scores of the config's training set (float64, row i = trainset index i). The training set is
    the first n_train rows of the TensorData `data` (all of them by default; splits.py puts the
    training rows first). The file must belong to this training set (see the module docstring): that
    is checked before its scores are read."""
    n_train = len(data) if n_train is None else n_train
    path, fix = memscore_path(args.dataset_name, args.model_name), memscore_fix(args)
    if not os.path.isfile(path):
        raise MissingError(f"mem-scores {path} not found; {fix}")
    with open(path, "rb") as f:
        csv_bytes = f.read()
    source = split_source(args.dataset_name)
    if os.path.isfile(sidecar_path(path)):
        check_fingerprint(args, path, csv_bytes, data.x[:n_train], data.y[:n_train], source)
    else:
        check_unsigned(args, path, source, csv_bytes)
    return read_memscores(path, n_train, fix, csv_bytes)

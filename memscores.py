"""Per-sample mem-scores of a config's training set (README: Mem-scores): reading the authors' CSV format."""
import os

import numpy as np
import pandas as pd
import torch

from common import MissingError
from paths import memscore_path

AUTHORS_MEMSCORES = {(ds, model) for ds in ("cifar10", "cifar100", "cinic")
                     for model in ("resnet18", "densenet121", "vgg16bn")} | {("location", "columnfc")}


def memscore_fix(args) -> str:
    """How to get the mem-score file of this config: the authors' CSV where one exists, else compute it."""
    compute = f"compute it with python compute_memscore.py {args.gpu_id} {args.config_path} (README: Mem-scores)"
    if (args.dataset_name, args.model_name) in AUTHORS_MEMSCORES:
        return f"put the authors' published CSV there, or {compute}"
    return compute


def read_memscores(path: str, n_train: int, fix: str) -> torch.Tensor:
    """The authors' CSV (unnamed index column 0..n-1, one column named 0) -> float64 tensor, row i = trainset index i."""
    try:
        frame = pd.read_csv(path, index_col=0)
    except Exception as err:  # missing, empty, not a CSV
        raise MissingError(f"mem-scores {path} is not a readable CSV ({type(err).__name__}); {fix}")
    if list(frame.columns) != ["0"] or not pd.api.types.is_numeric_dtype(frame["0"]):
        raise MissingError(f"mem-scores {path} must hold an index column and one numeric column named 0; {fix}")
    if len(frame) != n_train:
        raise MissingError(f"mem-scores {path} has {len(frame)} rows but the training set has {n_train} samples "
                           f"(made for another dataset or split); {fix}")
    if not np.array_equal(frame.index.to_numpy(), np.arange(n_train)):
        raise MissingError(f"mem-scores {path}: the index column must count 0..{n_train - 1} in order; {fix}")
    scores = frame["0"].to_numpy(np.float64)
    if not np.isfinite(scores).all():
        raise MissingError(f"mem-scores {path}: row {int(np.argmin(np.isfinite(scores)))} is not a number; {fix}")
    return torch.tensor(scores)


def load_memscores(args, n_train: int) -> torch.Tensor:
    """Mem-scores of the config's training set (float64, row i = trainset index i); n_train is the
    training set's size, as the split records it."""
    path, fix = memscore_path(args.dataset_name, args.model_name), memscore_fix(args)
    if not os.path.isfile(path):
        raise MissingError(f"mem-scores {path} not found; {fix}")
    return read_memscores(path, n_train, fix)

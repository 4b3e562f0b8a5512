"""The victim/shadow data split of the release (docs/pipeline.md#the-split), persisted as index arrays.

The training set is halved into the victim's and the shadows' pools. Each model trains on 90% of its
pool; the other 10% plus the whole test set are cut 34/66 into its dev and test (non-member) parts.

All indices point into one index space: the training set's rows first, then the test set's
(TensorData.concat(train, test)), so trainset index i (and its mem-score row) is index i here.
"""

import os
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from common import MissingError, UsageError, read_npz, save_npz
from datasets import DATASETS, TensorData, get_dataset
from models import TARGET_MODELS
from paths import split_path
from train import OPTIMIZERS


@dataclass
class ModelSplit:
    train: torch.Tensor  # members
    dev: torch.Tensor
    test: torch.Tensor  # non-members

    def to(self, device: torch.device) -> "ModelSplit":
        return ModelSplit(self.train.to(device), self.dev.to(device), self.test.to(device))


def _dev_test(held, n_train, n_test, seed):
    """Pool = held-out training rows followed by the whole test set; split 34/66 into dev/test."""
    pool = np.concatenate([np.asarray(held), n_train + np.arange(n_test)])
    dev, test = train_test_split(range(len(pool)), test_size=0.66, random_state=seed)
    return pool[dev], pool[test]


def make_split(n_train: int, n_test: int, seed: int, shadow_num: int) -> dict:
    """{'victim_train': ..., 'victim_dev': ..., 'victim_test': ..., 'shadow_train_0': ...} index arrays."""
    victim_list, shadow_list = train_test_split(range(n_train), test_size=0.5, random_state=seed)
    out = {}
    train, held = train_test_split(victim_list, test_size=0.1, random_state=seed)
    out["victim_train"] = np.asarray(train)
    out["victim_dev"], out["victim_test"] = _dev_test(held, n_train, n_test, seed)
    for i in range(shadow_num):
        train, held = train_test_split(shadow_list, test_size=0.1, random_state=seed + i)
        out[f"shadow_train_{i}"] = np.asarray(train)
        out[f"shadow_dev_{i}"], out[f"shadow_test_{i}"] = _dev_test(held, n_train, n_test, seed + i)
    return {k: v.astype(np.int64) for k, v in out.items()}


class Split:
    """The persisted split: .indices() is the victim's ModelSplit, .indices(i) shadow i's."""

    def __init__(self, arrays, meta):
        self.arrays, self.meta = arrays, meta

    @property
    def shadow_num(self) -> int:
        return int(self.meta["shadow_num"])

    def indices(self, shadow: int = None) -> ModelSplit:
        """The train/dev/test index tensors of the victim (shadow=None) or of shadow i."""
        who = "victim" if shadow is None else "shadow"
        tail = "" if shadow is None else f"_{shadow}"
        if shadow is not None and shadow >= self.shadow_num:
            raise UsageError(
                f"the split has {self.shadow_num} shadows, shadow {shadow} was asked for; "
                f"lower --shadow_num or rerun pretrain_modi.py with a larger --shadow_num --force"
            )
        return ModelSplit(*(torch.from_numpy(self.arrays[f"{who}_{part}{tail}"]) for part in ("train", "dev", "test")))

    def save(self, path: str) -> None:
        save_npz(path, self.arrays, self.meta)

    @classmethod
    def create(cls, dataset_name: str, n_train: int, n_test: int, seed: int, shadow_num: int) -> "Split":
        meta = {"dataset": dataset_name, "n_train": n_train, "n_test": n_test, "seed": seed, "shadow_num": shadow_num}
        return cls(make_split(n_train, n_test, seed, shadow_num), meta)

    @classmethod
    def load(cls, path: str) -> "Split":
        if not os.path.isfile(path):
            raise MissingError(f"data split {path} not found; run pretrain_modi.py with this config first")
        try:
            arrays, meta = read_npz(path)
        except Exception as err:
            raise MissingError(
                f"data split {path} is unreadable ({type(err).__name__}); "
                f"rerun pretrain_modi.py with --force to rebuild it"
            )
        shadows = meta.get("shadow_num") if isinstance(meta.get("shadow_num"), int) else -1
        want = {
            f"{who}_{part}{tail}"
            for who, tail in [("victim", "")] + [("shadow", f"_{i}") for i in range(shadows)]
            for part in ("train", "dev", "test")
        }
        if shadows < 0 or not {"dataset", "n_train", "n_test", "seed"} <= set(meta) or not want <= set(arrays):
            raise MissingError(
                f"data split {path} was not made by pretrain_modi.py (arrays or meta missing); "
                f"rerun pretrain_modi.py with --force to rebuild it"
            )
        split = cls(arrays, meta)
        why = split.damage()
        if why:
            raise MissingError(
                f"data split {path} is damaged ({why}); rerun pretrain_modi.py with --force to rebuild "
                f"it (models trained on it must then be retrained)"
            )
        return split

    def damage(self) -> str:
        """What makes the index arrays unusable, or None: each part a non-empty 1-D integer array inside
        the index space, a model's train/dev/test disjoint, and no victim member among a shadow's
        non-members (nor a shadow member among the victim's): every one would mislabel members."""
        n_train, n_test = self.meta["n_train"], self.meta["n_test"]
        if not (isinstance(n_train, int) and isinstance(n_test, int) and n_train > 0 and n_test >= 0):
            return f"n_train={n_train!r}, n_test={n_test!r}"
        for name, array in self.arrays.items():
            if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_:
                return f"{name} is not a 1-D integer array ({array.dtype}, shape {array.shape})"
            if len(array) == 0:
                return f"{name} is empty"
            if array.min() < 0 or array.max() >= n_train + n_test:
                return f"{name} holds indices outside 0..{n_train + n_test - 1}"
            if len(np.unique(array)) != len(array):
                return f"{name} repeats an index"
        for who, tail in [("victim", "")] + [("shadow", f"_{i}") for i in range(self.shadow_num)]:
            parts = [f"{who}_{part}{tail}" for part in ("train", "dev", "test")]
            for a, b in ((0, 1), (0, 2), (1, 2)):
                if np.intersect1d(self.arrays[parts[a]], self.arrays[parts[b]]).size:
                    return f"{parts[a]} and {parts[b]} overlap"
        for i in range(self.shadow_num):
            for members, others in (("victim_train", f"shadow_test_{i}"), (f"shadow_train_{i}", "victim_test")):
                if np.intersect1d(self.arrays[members], self.arrays[others]).size:
                    return f"members of {members} are non-members in {others}"
        return None

    def mismatch(self, dataset_name: str, n_train: int, n_test: int, seed: int = None, shadow_num: int = 0) -> str:
        """Why this split cannot serve the given run, or None (seed=None: any seed will do)."""
        want = {"dataset": dataset_name, "n_train": n_train, "n_test": n_test, "seed": seed}
        for key, value in want.items():
            if value is not None and self.meta.get(key) != value:
                return f"it was made with {key}={self.meta.get(key)}, this run has {key}={value}"
        if shadow_num > self.shadow_num:
            return f"it has {self.shadow_num} shadows, this run asks for {shadow_num}"
        return None


def open_run(args, device: torch.device) -> tuple:
    """(data, split): the dataset (train rows then test rows, on device, with the run's --amp) and the
    persisted split of a pretrained run. The caller has checked the config (check_config) first."""
    train, test = get_dataset(args.dataset_name)
    split = Split.load(split_path(args))
    why = split.mismatch(args.dataset_name, len(train), len(test))
    if why:
        raise MissingError(
            f"data split {split_path(args)} does not match the dataset ({why}); rerun pretrain_modi.py with --force"
        )
    return TensorData.concat(train, test).to(device, amp=args.amp), split


def check_config(args) -> None:
    """dataset_name/model_name known and num_cls/input_dim agreeing with the dataset."""
    if args.dataset_name not in DATASETS:
        raise UsageError(f"unknown dataset_name '{args.dataset_name}'; valid: {', '.join(DATASETS)}")
    if args.model_name not in TARGET_MODELS:
        raise UsageError(f"unknown model_name '{args.model_name}'; valid: {', '.join(TARGET_MODELS)}")
    num_cls, input_dim = DATASETS[args.dataset_name]
    if (args.num_cls, args.input_dim) != (num_cls, input_dim):
        raise UsageError(
            f"config has num_cls={args.num_cls}, input_dim={args.input_dim} but "
            f"{args.dataset_name} has num_cls={num_cls}, input_dim={input_dim}; fix the config"
        )
    if (input_dim == 3) != (args.model_name != "columnfc"):  # input_dim 3 = the image datasets
        raise UsageError(
            f"model_name '{args.model_name}' does not fit dataset {args.dataset_name}; use columnfc "
            f"for tabular data and resnet18, vgg16bn or densenet121 for images"
        )
    if args.optimizer not in OPTIMIZERS:
        raise UsageError(f"unknown optimizer '{args.optimizer}'; valid: {', '.join(OPTIMIZERS)}")
    for key, ok, want in (
        ("epochs", args.epochs >= 1, ">= 1"),
        ("lr", args.lr > 0, "> 0"),
        ("weight_decay", args.weight_decay >= 0, ">= 0"),
    ):
        if not ok:
            raise UsageError(f"{key} must be {want}, got {getattr(args, key)}; fix the config or pass --{key}")

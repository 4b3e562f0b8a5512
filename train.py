"""Training, evaluation, checkpoints and the one fine-tuning loop used by pretraining and pruning,
for the victim and every shadow alike."""

import glob
import hashlib
import json
import math
import os
import shutil
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import (
    DivergedError,
    MissingError,
    UsageError,
    atomic_write,
    check_writable,
    load_torch,
    pid_alive,
    save_torch,
)
from datasets import TensorData
from models import build_model
from paths import checkpoint, completion_file, split_of, staging_dir

OPTIMIZERS = ("adam", "sgd")
EVAL_BATCH = 1024


def autocast(data: TensorData):
    """bfloat16 autocast around forward passes when the data asks for it (--amp) and lives on a GPU;
    off keeps the numbers comparable with the paper's float32."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=data.amp and data.x.device.type == "cuda")


def make_optimizer(params, name: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    raise UsageError(f"unknown optimizer '{name}'; valid: {', '.join(OPTIMIZERS)}")


def full_precision(out):
    """float32 logits out of an autocast region; anything else as it is."""
    return out.float() if out.dtype in (torch.bfloat16, torch.float16) else out


def minibatches(idx: torch.Tensor, batch_size: int, shuffle: bool = True, generator=None) -> tuple:
    """Index tensors of one pass over idx, shuffled with `generator` (a torch.Generator on idx's device) or,
    without one, the global torch RNG."""
    if shuffle:
        idx = idx[torch.randperm(len(idx), generator=generator, device=idx.device)]
    return idx.split(batch_size)


def train_pass(
    model: nn.Module,
    data: TensorData,
    idx: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    batch_size: int,
    loss_fn=F.cross_entropy,
    before_step=None,
) -> tuple:
    """One shuffled pass over idx: forward, loss_fn(logits, y), backward, step. Returns (loss, acc %).
    before_step(), if given, runs before each batch's forward (ADV trains its inference model there)."""
    model.train()
    total_loss = torch.zeros((), device=idx.device)
    correct = torch.zeros((), dtype=torch.long, device=idx.device)
    for batch in minibatches(idx, batch_size):
        if before_step is not None:
            before_step()
        x, y = data.batch(batch)
        with autocast(data):
            out = full_precision(model(x))
            loss = loss_fn(out, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total_loss += loss.detach() * len(batch)
        correct += (out.detach().argmax(1) == y).sum()
    n = max(len(idx), 1)
    return total_loss.item() / n, 100.0 * correct.item() / n


@torch.inference_mode()
def predict(model: nn.Module, data: TensorData, idx: torch.Tensor, batch_size: int = EVAL_BATCH) -> torch.Tensor:
    """Logits for data[idx], in order."""
    model.eval()
    with autocast(data):
        return torch.cat([full_precision(model(data.batch(b)[0])) for b in idx.split(batch_size)])


@torch.inference_mode()
def evaluate(model: nn.Module, data: TensorData, idx: torch.Tensor, batch_size: int = EVAL_BATCH) -> tuple:
    """(accuracy %, mean cross-entropy) on data[idx]."""
    logits = predict(model, data, idx, batch_size)
    y = data.y[idx]
    loss = F.cross_entropy(logits, y, reduction="sum").item() / len(idx)
    return 100.0 * (logits.argmax(1) == y).float().mean().item(), loss


def save_checkpoint(path: str, model: nn.Module, epoch: int, acc: float, loss: float) -> None:
    """best.pth = {epoch, acc, loss, state}; state is a plain state_dict."""
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    save_torch({"epoch": epoch, "acc": acc, "loss": loss, "state": state}, path)


def fit(
    model: nn.Module,
    train_epoch,
    data: TensorData,
    dev_idx: torch.Tensor,
    test_idx: torch.Tensor,
    epochs: int,
    early_stop: int,
    on_best,
    on_epoch=None,
    start_acc: float = -1.0,
) -> tuple:
    """The fine-tuning loop: train_epoch(epoch) then evaluate dev and test; on_best(epoch, dev_acc,
    dev_loss) when dev accuracy strictly improves on the best so far, which starts at start_acc; stop once
    `early_stop` (>0) epochs pass without improvement. Returns (best dev acc, last dev loss). The default
    -1 makes the first epoch a best one whatever its accuracy, so every call exports a model; the release
    starts at 0 (pretraining, and prune_modi.py's --semantics release), where epochs of exactly 0% dev
    accuracy export nothing."""
    best_acc, stall, dev_loss = start_acc, 0, float("nan")
    for epoch in range(epochs):
        train_loss, train_acc = train_epoch(epoch)
        if math.isfinite(train_acc) and not math.isfinite(train_loss):  # (nan, nan): an epoch that trained nothing
            raise DivergedError(
                f"training diverged: the loss of epoch {epoch} is {train_loss} (nothing of this epoch "
                f"is saved); lower --lr, or check the config's lr and weight decays"
            )
        dev_acc, dev_loss = evaluate(model, data, dev_idx)
        test_acc, test_loss = evaluate(model, data, test_idx)
        if on_epoch is not None:
            on_epoch(
                epoch,
                {
                    "train_loss": train_loss,
                    "train_acc": train_acc,
                    "dev_loss": dev_loss,
                    "dev_acc": dev_acc,
                    "test_loss": test_loss,
                    "test_acc": test_acc,
                },
            )
        if dev_acc > best_acc:
            best_acc, stall = dev_acc, 0
            on_best(epoch, dev_acc, dev_loss)
        else:
            stall += 1
            if early_stop > 0 and stall > early_stop:
                break
    return best_acc, dev_loss


def load_checkpoint(model: nn.Module, path: str, what: str, fix: str) -> dict:
    """Load best.pth (or a plain state_dict) into model, with readable errors."""
    ckpt = load_torch(path, what, fix)
    state = ckpt.get("state", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise MissingError(f"{what} {path} holds no state_dict; delete it and {fix}")
    broken = [k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point() and not v.isfinite().all()]
    if broken:  # a diverged run's weights: every attack on them reads as perfect privacy
        raise MissingError(f"{what} {path} holds NaN or infinite weights ({broken[0]}); {fix}")
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        detail = first[1].strip() if len(first) > 1 else first[0]
        raise MissingError(
            f"{what} {path} does not fit this config's model ({detail}); "
            f"it was made for another dataset/model/num_cls: {fix}"
        )
    return ckpt


def load_model(args, path: str, device: torch.device, what: str, fix: str, finished: bool = False) -> tuple:
    """(model, checkpoint): a fresh model of the config's architecture (built, so seeded runs draw the
    same initial weights as ever) with the checkpoint at path loaded into it. With finished, the
    checkpoint must belong to a finished run (check_finished)."""
    model = build_model(args.model_name, args.num_cls, args.input_dim).to(device)
    ckpt = load_checkpoint(model, path, what, fix)
    if finished:
        check_finished(os.path.dirname(path), ckpt, fix)
    return model, ckpt


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def warn_release_format(paths: list) -> None:
    """One warning line for checkpoints taken in the release's own format (no completion record)."""
    if paths:
        print(
            f"warning: {len(paths)} checkpoint(s) have no completion record and are taken as made by the "
            f"paper's release (a plain state_dict), e.g. {paths[0]}",
            file=sys.stderr,
        )


def clear_finished(folder: str) -> None:
    """Before a run writes into folder: its model is no longer the finished one of an earlier run."""
    if os.path.exists(completion_file(folder)):
        os.remove(completion_file(folder))


def mark_finished(folder: str, split: str, **info) -> None:
    """Write folder/complete.json once the folder's model is final: the checkpoint's SHA-256, the SHA-256 of
    the split file it was trained on, and info."""
    record = {
        "checkpoint_sha256": file_sha256(checkpoint(folder)),
        "split_sha256": file_sha256(split),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        **info,
    }
    atomic_write(completion_file(folder), lambda f: f.write(json.dumps(record, indent=1).encode()))


class Staging:
    """The model folders of one run, written beside them (paths.staging_dir) and moved into place only by
    publish(), once their models are final. Leaving the block otherwise (an error, Ctrl-C, SIGTERM) discards
    the staged folders, so each folder keeps the model of the last run that finished it; a kill -9 leaves
    a staged folder behind, which the next run on this host removes."""

    def __init__(self, folders: list):
        self.folders = list(folders)
        self.staged = [staging_dir(folder) for folder in self.folders]

    def __enter__(self) -> "Staging":
        for folder in self.folders:  # all of them before any is written: publish() must not stop half-way
            check_writable(folder)
        for folder, staged in zip(self.folders, self.staged):
            remove_dead_staging(folder)
            shutil.rmtree(staged, ignore_errors=True)
            os.makedirs(staged)
        return self

    def publish(self) -> None:
        """Move every staged folder's files into its folder, the completion record last: until it arrives the
        folder holds no record, so a kill in between is refused downstream, never taken."""
        for folder, staged in zip(self.folders, self.staged):
            os.makedirs(folder, exist_ok=True)
            clear_finished(folder)
            names = sorted(os.listdir(staged), key=lambda name: name == os.path.basename(completion_file(staged)))
            for name in names:
                os.replace(os.path.join(staged, name), os.path.join(folder, name))
            os.rmdir(staged)

    def __exit__(self, *exc) -> bool:
        for staged in self.staged:
            shutil.rmtree(staged, ignore_errors=True)
        return False


def remove_dead_staging(folder: str) -> None:
    """Staged folders of folder left by runs on this host that no longer run (killed with -9)."""
    for path in glob.glob(staging_dir(glob.escape(folder), "*")):
        pid = path.rsplit("-", 1)[1]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def completion_record(folder: str) -> dict:
    """folder's completion record; None without a readable one that names a checkpoint."""
    try:
        with open(completion_file(folder)) as f:
            record = json.load(f)
        return record if isinstance(record.get("checkpoint_sha256"), str) else None
    except (OSError, ValueError, AttributeError):
        return None


def holds_recorded_checkpoint(folder: str, record: dict) -> bool:
    return os.path.isfile(checkpoint(folder)) and file_sha256(checkpoint(folder)) == record["checkpoint_sha256"]


def is_finished(folder: str) -> bool:
    """Whether folder holds the checkpoint its completion record names."""
    record = completion_record(folder)
    return record is not None and holds_recorded_checkpoint(folder, record)


def check_finished(folder: str, ckpt: dict, fix: str) -> None:
    """One line (MissingError) unless folder's checkpoint is the one its completion record names. A
    checkpoint in the release's own format (a plain state_dict) has no record and passes; the caller
    warns about it."""
    record_path = completion_file(folder)
    if not os.path.isfile(record_path):
        if "state" in ckpt:  # ours: the run that writes it never finished
            raise MissingError(
                f"{checkpoint(folder)} belongs to a run that did not finish (no {record_path}: it "
                f"was killed or is still running); {fix}"
            )
        return
    record = completion_record(folder)
    if record is None:
        raise MissingError(f"completion record {record_path} is unreadable; {fix}")
    if not holds_recorded_checkpoint(folder, record):
        raise MissingError(
            f"{checkpoint(folder)} changed after its run finished (it is not the checkpoint "
            f"{record_path} names: a later run was killed or is still running); {fix}"
        )
    split = split_of(folder)
    trained_on = record.get("split_sha256")
    if trained_on is not None and os.path.isfile(split) and file_sha256(split) != trained_on:
        raise MissingError(
            f"{checkpoint(folder)} was trained on another data split than {split} (the split was "
            f"rebuilt after it finished); {fix}"
        )

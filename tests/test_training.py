"""train.py: the fine-tuning loop (best-dev checkpoint, early stopping), passes, optimizers, checkpoints."""

import os

import pytest
import torch
import torch.nn as nn

import train
from common import MissingError, UsageError
from datasets import TensorData
from models import ColumnFC
from train import fit, load_checkpoint, make_optimizer, minibatches, save_checkpoint, train_pass


def scripted_fit(monkeypatch, tmp_path, dev_accs, early_stop, epochs=None):
    """Run fit on a 1-weight model whose weight equals the epoch number; evaluate is replaced by a
    scripted dev accuracy sequence (dev loss = epoch + 0.5). Returns (epochs run, fit's result, best.pth)."""
    model = nn.Linear(1, 1, bias=False)
    dev_idx, test_idx = torch.arange(3), torch.arange(3, 5)
    ran = []

    def train_epoch(epoch):
        ran.append(epoch)
        with torch.no_grad():
            model.weight.fill_(epoch)
        return 0.0, 0.0

    def fake_evaluate(m, data, idx):
        assert m is model
        if idx is dev_idx:
            return dev_accs[ran[-1]], ran[-1] + 0.5
        assert idx is test_idx
        return -1.0, -1.0

    monkeypatch.setattr(train, "evaluate", fake_evaluate)
    path = str(tmp_path / "best.pth")
    result = fit(
        model,
        train_epoch,
        None,
        dev_idx,
        test_idx,
        epochs or len(dev_accs),
        early_stop,
        on_best=lambda epoch, acc, loss: save_checkpoint(path, model, epoch, acc, loss),
    )
    return ran, result, torch.load(path, weights_only=True)


def test_fit_counter_reaching_early_stop_does_not_stop(monkeypatch, tmp_path):
    #            0   1   2   3   4   5   6   7   8   9
    dev_accs = [50, 60, 60, 55, 70, 70, 65, 65, 99, 98]
    ran, (best_acc, last_loss), ckpt = scripted_fit(monkeypatch, tmp_path, dev_accs, early_stop=3)
    # after epoch 4 the counter reaches 3 at epoch 7 (not > 3); epoch 8 improves and resets it
    assert ran == list(range(10))
    assert (best_acc, last_loss) == (99, 9.5)  # last dev loss, not the best epoch's
    assert (ckpt["epoch"], ckpt["acc"], ckpt["loss"], ckpt["state"]["weight"].item()) == (8, 99, 8.5, 8.0)


def test_fit_stops_when_counter_exceeds_early_stop(monkeypatch, tmp_path):
    dev_accs = [50, 60, 60, 55, 70, 70, 65, 65, 64, 99, 99]
    ran, (best_acc, last_loss), ckpt = scripted_fit(monkeypatch, tmp_path, dev_accs, early_stop=3)
    assert ran == list(range(9))  # stall after epoch 5,6,7,8 = 4 > 3 -> stop after epoch 8
    assert (best_acc, last_loss) == (70, 8.5)
    assert (ckpt["epoch"], ckpt["acc"], ckpt["loss"]) == (4, 70, 4.5)  # the first 70, not the tie at epoch 5
    assert ckpt["state"]["weight"].item() == 4.0  # the weights of that epoch


def test_fit_ties_never_replace_the_checkpoint(monkeypatch, tmp_path):
    ran, (best_acc, _), ckpt = scripted_fit(monkeypatch, tmp_path, [80, 80, 80, 80], early_stop=5)
    assert ran == [0, 1, 2, 3] and best_acc == 80 and ckpt["epoch"] == 0 and ckpt["state"]["weight"].item() == 0.0


def test_early_stop_zero_disables(monkeypatch, tmp_path):
    dev_accs = [90] + [10] * 11
    ran, (best_acc, last_loss), ckpt = scripted_fit(monkeypatch, tmp_path, dev_accs, early_stop=0)
    assert ran == list(range(12)) and best_acc == 90 and last_loss == 11.5 and ckpt["epoch"] == 0
    ran, _, _ = scripted_fit(monkeypatch, tmp_path, dev_accs, early_stop=1)
    assert ran == [0, 1, 2]


def test_fit_reports_every_epoch(monkeypatch, tmp_path):
    model = nn.Linear(1, 1)
    monkeypatch.setattr(train, "evaluate", lambda m, d, idx: (float(len(idx)), 0.25))
    seen = []
    fit(
        model,
        lambda e: (1.5, 40.0),
        None,
        torch.arange(3),
        torch.arange(7),
        2,
        5,
        on_best=lambda *a: None,
        on_epoch=lambda epoch, stats: seen.append((epoch, stats)),
    )
    assert seen[0] == (
        0,
        {"train_loss": 1.5, "train_acc": 40.0, "dev_loss": 0.25, "dev_acc": 3.0, "test_loss": 0.25, "test_acc": 7.0},
    )
    assert [e for e, _ in seen] == [0, 1]


def test_checkpoint_format_and_weights_only_load(tmp_path):
    model = ColumnFC(8, 3)
    path = tmp_path / "sub" / "best.pth"
    save_checkpoint(str(path), model, 4, 87.5, 0.31)
    ckpt = torch.load(path, weights_only=True)
    assert set(ckpt) == {"epoch", "acc", "loss", "state"}
    assert (ckpt["epoch"], ckpt["acc"], ckpt["loss"]) == (4, 87.5, 0.31)
    assert set(ckpt["state"]) == set(model.state_dict())
    fresh = ColumnFC(8, 3)
    assert load_checkpoint(fresh, str(path), "checkpoint", "rerun")["epoch"] == 4
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in model.state_dict().items())
    torch.save(model.state_dict(), tmp_path / "plain.pth")  # a plain state_dict loads too
    load_checkpoint(ColumnFC(8, 3), str(tmp_path / "plain.pth"), "checkpoint", "rerun")


def test_load_checkpoint_errors_are_one_line(tmp_path):
    path = tmp_path / "best.pth"
    save_checkpoint(str(path), ColumnFC(8, 3), 0, 1.0, 1.0)
    with pytest.raises(MissingError, match="does not fit this config's model") as shape:
        load_checkpoint(ColumnFC(8, 5), str(path), "pretrained checkpoint", "run pretrain_modi.py first")
    with pytest.raises(MissingError, match="not found; run pretrain_modi.py first") as missing:
        load_checkpoint(ColumnFC(8, 3), str(tmp_path / "none.pth"), "checkpoint", "run pretrain_modi.py first")
    (tmp_path / "junk.pth").write_bytes(b"\x00junk")
    with pytest.raises(MissingError, match="corrupt") as corrupt:
        load_checkpoint(ColumnFC(8, 3), str(tmp_path / "junk.pth"), "checkpoint", "rerun")
    for err in (shape, missing, corrupt):
        assert "\n" not in str(err.value) and str(path.parent) in str(err.value)
    assert "fc3" in str(shape.value)


def test_make_optimizer():
    params = [nn.Parameter(torch.zeros(2))]
    adam = make_optimizer(params, "adam", 0.001, 5e-4)
    assert isinstance(adam, torch.optim.Adam)
    group = adam.param_groups[0]
    assert (group["lr"], group["betas"], group["weight_decay"]) == (0.001, (0.9, 0.999), 5e-4)
    sgd = make_optimizer(params, "sgd", 0.1, 1e-4)
    assert isinstance(sgd, torch.optim.SGD)
    group = sgd.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.1, 0.9, 1e-4)
    with pytest.raises(UsageError, match="unknown optimizer 'rmsprop'; valid: adam, sgd"):
        make_optimizer(params, "rmsprop", 0.1, 0.0)


class RecordingData(TensorData):
    def __init__(self, x, y):
        super().__init__(x, y)
        self.batches = []

    def batch(self, idx):
        self.batches.append(idx.tolist())
        return super().batch(idx)


def test_train_pass_visits_each_index_once_and_steps():
    torch.manual_seed(0)
    data = RecordingData(torch.rand(30, 4), torch.randint(0, 3, (30,)))
    idx = torch.tensor([3, 5, 7, 11, 13, 17, 19, 23, 29, 2])
    model = nn.Linear(4, 3)
    before = model.weight.detach().clone()
    steps = []
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    optimizer.register_step_post_hook(lambda *a: steps.append(1))
    loss, acc = train_pass(model, data, idx, optimizer, batch_size=4)
    assert [len(b) for b in data.batches] == [4, 4, 2] and len(steps) == 3
    assert sorted(sum(data.batches, [])) == sorted(idx.tolist())
    assert not torch.equal(model.weight, before)
    assert 0 <= acc <= 100 and loss > 0


def test_amp_is_cuda_only_and_leaves_cpu_numbers_unchanged():
    def one_pass(amp):
        torch.manual_seed(0)
        model = ColumnFC(64, 10)
        data = TensorData(torch.rand(300, 64), torch.randint(0, 10, (300,)), amp=amp)
        optimizer = train.make_optimizer(model.parameters(), "adam", 1e-3, 5e-4)
        result = train.train_pass(model, data, torch.arange(300), optimizer, 128)
        return result, train.predict(model, data, torch.arange(300))

    (plain, plain_logits), (amp, amp_logits) = one_pass(False), one_pass(True)
    assert plain == amp and torch.equal(plain_logits, amp_logits)
    assert plain_logits.dtype == torch.float32
    on_cpu = TensorData(torch.rand(3, 4), torch.zeros(3, dtype=torch.long), amp=True)
    assert train.autocast(on_cpu).fast_dtype == torch.bfloat16 and not train.autocast(on_cpu)._enabled
    assert on_cpu.to("cpu").amp and not on_cpu.to("cpu", amp=False).amp  # .to keeps the choice unless told


def test_a_diverged_epoch_stops_fit_before_anything_is_saved():
    saved = []
    epochs = iter([(0.5, 60.0), (float("nan"), 10.0)])
    data = TensorData(torch.rand(8, 4), torch.zeros(8, dtype=torch.long))
    model = nn.Linear(4, 2)
    with pytest.raises(train.DivergedError, match=r"training diverged: the loss of epoch 1 is nan"):
        fit(
            model,
            lambda epoch: next(epochs),
            data,
            torch.arange(4),
            torch.arange(4, 8),
            5,
            0,
            on_best=lambda *best: saved.append(best[0]),
        )
    assert saved == [0]  # epoch 0 was saved as best, the diverged epoch 1 was not
    quiet = iter([(float("nan"), float("nan"))] * 2)  # an RSW epoch whose window is empty trains nothing
    fit(model, lambda epoch: next(quiet), data, torch.arange(4), torch.arange(4, 8), 2, 0, on_best=lambda *a: None)


def test_a_checkpoint_with_nan_weights_is_refused(tmp_path):
    model = nn.Linear(4, 2)
    with torch.no_grad():
        model.weight[0, 1] = float("nan")
    save_checkpoint(str(tmp_path / "best.pth"), model, 0, 50.0, 1.0)
    with pytest.raises(MissingError, match=r"best.pth holds NaN or infinite weights \(weight\); rerun it"):
        load_checkpoint(nn.Linear(4, 2), str(tmp_path / "best.pth"), "checkpoint", "rerun it")


def test_checkpoints_follow_the_umask(tmp_path):
    import os

    old = os.umask(0o022)
    try:
        save_checkpoint(str(tmp_path / "best.pth"), nn.Linear(4, 2), 0, 50.0, 1.0)
    finally:
        os.umask(old)
    assert (tmp_path / "best.pth").stat().st_mode & 0o777 == 0o644


def test_a_full_disk_is_an_oserror_naming_the_file(tmp_path, monkeypatch, capsys):
    """torch.save fails with RuntimeError on a full disk; the run ends with one line naming the file,
    and the old checkpoint stays."""
    import collections
    import shutil

    import common

    path = tmp_path / "best.pth"
    save_checkpoint(str(path), nn.Linear(4, 2), 0, 50.0, 1.0)
    before = path.read_bytes()

    def full(obj, f):
        f.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing file")

    monkeypatch.setattr(torch, "save", full)
    monkeypatch.setattr(shutil, "disk_usage", lambda d: collections.namedtuple("U", "total used free")(1, 1, 0))
    with pytest.raises(SystemExit) as exit_:
        common.main_guard(lambda: save_checkpoint(str(path), nn.Linear(4, 2), 1, 60.0, 0.5))
    assert exit_.value.code == 1
    assert capsys.readouterr().err == (
        f"error: cannot read or write {path} (No space left on device); check that "
        f"path, its permissions and the free disk space\n"
    )
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["best.pth"]


@pytest.mark.parametrize("sig, message", [("SIGINT", "Ctrl-C"), ("SIGTERM", "SIGTERM")])
def test_an_interrupt_while_torch_save_writes_is_an_interrupt(tmp_path, capsys, sig, message):
    """A Ctrl-C or SIGTERM that arrives while torch.save is writing waits until the write ends (inside the
    writer torch can turn it into an I/O error: `unexpected pos`), then ends the run as an interrupt, and the
    old checkpoint stays."""
    import signal

    import common

    path = tmp_path / "best.pth"
    save_checkpoint(str(path), nn.Linear(4, 2), 0, 50.0, 1.0)
    before = path.read_bytes()
    real_save, inside = torch.save, []

    class SignalOnFirstWrite:  # the file torch.save writes to; the signal comes from inside its writer
        def __init__(self, f):
            self.f, self.sent = f, False

        def write(self, data):
            if not self.sent:
                self.sent = True
                try:
                    os.kill(os.getpid(), getattr(signal, sig))
                    for _ in range(1000):  # bytecodes, where Python would act on the signal
                        pass
                except BaseException:  # arrived inside the writer: what torch can turn into an I/O error
                    inside.append(sig)
                    raise
            return self.f.write(data)

        def flush(self):
            self.f.flush()

    def run():
        common.atomic_write(str(path), lambda f: real_save({"x": torch.zeros(64)}, SignalOnFirstWrite(f)))

    # Python's own Ctrl-C handler, whatever an earlier test in this worker process left installed
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(SystemExit) as exit_:
            common.main_guard(run)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert inside == [] and exit_.value.code == (130 if sig == "SIGINT" else 143)
    err = capsys.readouterr().err
    assert err.startswith(f"error: interrupted ({message})"), err
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["best.pth"]


@pytest.mark.parametrize("start_acc, exported", [(-1.0, [0]), (0.0, [])], ids=["corrected", "release"])
def test_fit_epochs_of_zero_dev_accuracy(monkeypatch, tmp_path, start_acc, exported):
    """An epoch of exactly 0% dev accuracy is a best one from -1 (the default, corrected), not from 0 (the
    release's start, which then exports nothing)."""
    monkeypatch.setattr(train, "evaluate", lambda model, data, idx: (0.0, 1.0))
    calls = []
    result = fit(
        nn.Linear(1, 1),
        lambda epoch: (0.0, 0.0),
        None,
        torch.arange(2),
        torch.arange(2),
        3,
        0,
        on_best=lambda epoch, acc, loss: calls.append(epoch),
        start_acc=start_acc,
    )
    assert calls == exported and result == (max(start_acc, 0.0), 1.0)


def test_minibatches_with_a_generator_are_the_global_rngs():
    idx = torch.arange(50, 100)
    torch.manual_seed(5)
    by_global = minibatches(idx, 16)
    by_generator = minibatches(idx, 16, generator=torch.Generator().manual_seed(5))
    assert [b.tolist() for b in by_global] == [b.tolist() for b in by_generator]
    assert [len(b) for b in by_global] == [16, 16, 16, 2]

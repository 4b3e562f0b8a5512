"""Progress bars and TensorBoard scalars: on or off, every logged number stays the same.

The scripts' main() run in this process (a tiny digits pipeline, twice) so that stdout can be a
fake terminal and the bars really draw."""

import io
import re
import sys
from argparse import Namespace

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import attacks
import common
import mia_modi
import pretrain_modi
import progress
import prune_modi
from common import UsageError
from conftest import REPO

CONFIG = f"{REPO}/config/digits.json"
METRICS = ("train_acc", "train_loss", "dev_acc", "dev_loss", "test_acc", "test_loss")
PIPELINE = [
    (pretrain_modi, ["--epochs", "2", "--shadow_num", "1"]),
    (prune_modi, ["--pruner_name", "iter_prunetxt", "--prune_iter", "2", "--prune_epochs", "2", "--shadow_num", "1"]),
    (mia_modi, ["--pruner_name", "iter_prunetxt", "--attacks", "threshold,lira,nn_top3", "--shadow_num", "1"]),
]


class Terminal(io.StringIO):
    def isatty(self):
        return True


def run_pipeline(folder, monkeypatch, *flags, terminal=True):
    """pretrain, prune, attack in `folder`; returns everything written to stdout and stderr."""
    folder.mkdir()
    monkeypatch.chdir(folder)
    monkeypatch.setattr(attacks, "ATTACK_EPOCHS", 10)
    threads, shown = torch.get_num_threads(), []
    torch.set_num_threads(1)  # tiny models: on a busy machine more threads only spin
    try:
        for script, args in PIPELINE:
            out, err = (Terminal(), Terminal()) if terminal else (io.StringIO(), io.StringIO())
            with monkeypatch.context() as m:
                m.setattr(sys, "argv", [script.__file__, "-1", CONFIG, *args, *flags])
                m.setattr(sys, "stdout", out)
                m.setattr(sys, "stderr", err)
                script.main()
            shown.append(out.getvalue() + err.getvalue())
    finally:
        torch.set_num_threads(threads)
    return "".join(shown)


def without_timing(text):
    """The log without what differs between two runs of one command: the defend time, and the run id (start
    time, host, pid) in the name of the attack's scores file."""
    text = re.sub(r"defend time: [\d.]+s", "defend time: <t>s", text)
    return re.sub(r"\d{8}T\d{12}Z_[\w-]+_\d+", "<run id>", text)


def scalars_of(run_dir):
    events = EventAccumulator(str(run_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.mark.slow
def test_bars_and_tensorboard_change_no_number(tmp_path, monkeypatch):
    quiet = run_pipeline(tmp_path / "quiet", monkeypatch, "--quiet", "--no_tensorboard")
    live = run_pipeline(tmp_path / "live", monkeypatch)

    # the bars drew on the (fake) terminal only without --quiet: epochs, pruning iterations, attack model
    for desc in ("victim epochs: ", "shadow 0 pruning: ", "victim iter 1: ", "Top3-NN attack model: "):
        assert desc in live and desc not in quiet
    assert "it/s]" in live and "it/s]" not in quiet

    logs = sorted(p.relative_to(tmp_path / "quiet") for p in (tmp_path / "quiet" / "log").rglob("*.txt"))
    assert [str(p) for p in logs] == [
        "log/digits_columnfc/iter_prunetxt_0.6_base.txt",
        "log/digits_columnfc/pretrain.txt",
    ]
    read = lambda run, path: without_timing((tmp_path / run / path).read_text())
    for path in logs:
        assert read("live", path) == read("quiet", path)
    text = (tmp_path / "live" / logs[0]).read_text()
    assert "Top3-NN attack AUC: " in text and "LiRA attack accuracy: " in text
    for who in ("victim_model", "iter_prunetxt_0.6_model", "shadow_iter_prunetxt_0.6_model_0"):
        a, b = (
            torch.load(tmp_path / run / "result" / "digits_columnfc" / who / "best.pth", weights_only=True)
            for run in ("quiet", "live")
        )
        assert all(torch.equal(a["state"][k], b["state"][k]) for k in a["state"])

    assert not (tmp_path / "quiet" / "log" / "digits_columnfc" / "tb").exists()
    runs = sorted((tmp_path / "live" / "log" / "digits_columnfc" / "tb").iterdir())
    assert [r.name.rsplit("_", 1)[0] for r in runs] == ["iter_prunetxt_0.6", "pretrain"]
    assert all(list(r.glob("events.out.tfevents.*")) for r in runs)
    check_pretrain_scalars(scalars_of(runs[1]), (tmp_path / "live" / logs[1]).read_text())
    check_prune_scalars(scalars_of(runs[0]), text)


def check_pretrain_scalars(scalars, log):
    assert set(scalars) == {f"{m}/{k}" for m in ("victim", "shadow_0") for k in METRICS}
    assert all([step for step, _ in values] == [0, 1] for values in scalars.values())
    for who, tag in (("victim", "victim"), ("shadow 0", "shadow_0")):
        epoch, dev_acc = re.search(rf"Pretrained {who}: epoch (\d+), dev Accuracy ([\d.]+)", log).groups()
        assert dict(scalars[f"{tag}/dev_acc"])[int(epoch)] == pytest.approx(float(dev_acc), abs=1e-3)


def check_prune_scalars(scalars, log):
    per_iteration = ("iteration_sparsity", "iteration_best_dev_acc")
    assert set(scalars) == {f"{m}/{k}" for m in ("victim", "shadow_0") for k in METRICS + per_iteration}
    for who, tag in (("victim", "victim"), ("shadow 0", "shadow_0")):
        assert [step for step, _ in scalars[f"{tag}/dev_acc"]] == [0, 1, 2, 3]  # iteration * prune_epochs + epoch
        best = [float(a) for a in re.findall(rf"{who} iter \d best model: Accuracy ([\d.]+)", log)]
        assert [v for _, v in scalars[f"{tag}/iteration_best_dev_acc"]] == pytest.approx(best, abs=1e-3)
        assert max(v for _, v in scalars[f"{tag}/dev_acc"][:2]) == pytest.approx(best[0], abs=1e-3)
        sparsity = scalars[f"{tag}/iteration_sparsity"]
        assert [s for s, _ in sparsity] == [0, 1] and sparsity[0][1] == 0
        assert sparsity[1][1] == pytest.approx(0.6, abs=1e-3)  # fc1 and fc2 at the target


def test_bars_only_on_a_terminal_and_without_quiet(monkeypatch):
    monkeypatch.setattr(sys, "stdout", Terminal())
    assert not progress.Progress(quiet=False).bar(range(3)).disable
    assert progress.Progress(quiet=True).bar(range(3)).disable
    assert progress.Progress().bar(range(3)).disable  # the library default shows nothing
    monkeypatch.setattr(sys, "stdout", io.StringIO())  # a log file, a pipe
    assert progress.Progress(quiet=False).bar(range(3)).disable


def test_quiet_and_no_tensorboard_flags_on_every_script():
    for script, _ in PIPELINE:
        args = script.get_args(["-1", CONFIG, "--quiet", "--no_tensorboard"])
        assert args.quiet and args.no_tensorboard
        args = script.get_args(["-1", CONFIG])
        assert not args.quiet and not args.no_tensorboard


def test_tensorboard_is_needed_only_when_used(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if not installed
    args = Namespace(dataset_name="digits", model_name="columnfc", seed=7, no_tensorboard=True, quiet=True)
    progress.Progress.from_args(args, "run").add("victim/dev_acc", 1.0, 0)  # records nothing, needs nothing
    assert not (tmp_path / "log").exists()
    with pytest.raises(UsageError, match="--no_tensorboard"):
        progress.Progress.from_args(Namespace(**{**vars(args), "no_tensorboard": False}), "run")


def test_gpu_line_once_on_cuda_only(monkeypatch, tmp_path):
    log = tmp_path / "run.txt"
    common.log_gpu_usage(torch.device("cpu"), common.RunLog(str(log)))
    assert not log.exists()
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "Fake GPU 80GB")
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: 3 * 2**29)
    with common.RunLog(str(log)) as run_log:
        common.log_gpu_usage(torch.device("cuda:0"), run_log)
    assert log.read_text() == "GPU: Fake GPU 80GB, peak memory allocated 1.500 GiB\n"

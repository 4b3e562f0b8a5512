"""Faults that must not leave half-built results or guesses: grids that name one step twice, seeds whose
derived seeds overflow, failures after the first byte, log blocks that end early, summarize.py on
missing, empty or oddly named inputs, mem-scores that are no mem-scores. Real subprocesses, no mocks."""

import os
import signal

import pandas as pd
import pytest

from common import MissingError, RunLog, UsageError, main_guard
from conftest import as_repo, run_script
from helpers import copy_run, pretrain_cmd, prune_cmd, run_forked, start_script, wait_for
from memscores import load_memscores
from reporting import results
from test_memscore import N_DIGITS_TRAIN, digits_args, digits_train, write_csv

RUN = "result/digits_columnfc"
PRETRAIN = pretrain_cmd(1, 1)
PRUNE = prune_cmd(1, 1)
PRUNE_LOG = "log/digits_columnfc/iter_prunetxt_0.6_base.txt"
UNWRITABLE = "/proc/1"  # a folder nobody, root included, can create files in


def snapshot(folder):
    """{relative path: bytes} of every file under folder (links as their target)."""
    out = {}
    for d, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(d, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = f.read()
    return out


def one_error(proc, code):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == code and len(lines) == 1 and lines[0].startswith("error: "), (
        proc.returncode,
        proc.stdout[-2000:],
        proc.stderr[-2000:],
    )
    return lines[0]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A finished one-epoch pretraining (victim and one shadow)."""
    folder = tmp_path_factory.mktemp("pretrained")
    run_script(*PRETRAIN, cwd=folder)
    return folder


# ---------------------------------------------------------------- seeds


@pytest.mark.slow
def test_seed_range_covers_the_derived_seeds(tmp_path):
    """Shadow k and its split use seed + k + 1 and seed + k: the largest accepted seed is 2**32 - 1 - shadow_num,
    it runs to the end, and one more is refused before anything is written."""
    proc = run_forked(*PRETRAIN[:-3], "--shadow_num", "5", "--seed", "4294967291", "--force", cwd=tmp_path)
    assert one_error(proc, 2) == (
        "error: --seed must be in 0..4294967290 (numpy's seed range 0..4294967295 less "
        "--shadow_num 5: shadow k uses seed + k + 1), got 4294967291"
    )
    proc = run_forked(*PRETRAIN, "--seed", "4294967295", "--force", cwd=tmp_path)
    assert "error: --seed must be in 0..4294967294 " in one_error(proc, 2)
    assert os.listdir(tmp_path) == []
    run_script(*PRETRAIN, "--seed", "4294967294", "--force", cwd=tmp_path)
    run = tmp_path / "result/digits_columnfc_seed4294967294"
    assert sorted(os.listdir(run)) == ["shadow_model_0", "split.npz", "victim_model"]
    for model in ("victim_model", "shadow_model_0"):
        assert sorted(os.listdir(run / model)) == ["best.pth", "complete.json"]


# ---------------------------------------------------------------- nothing written by a failed run


@pytest.mark.slow
def test_pretrain_with_an_unwritable_shadow_folder_changes_no_file(pretrained, tmp_path):
    """The victim and shadow 0 would train fine; shadow 1's folder cannot be written: refused before the first
    byte, so the completion records and the log are byte-identical."""
    folder = copy_run(pretrained, tmp_path)
    os.symlink(UNWRITABLE, folder / RUN / "shadow_model_1")
    before = snapshot(folder)
    proc = run_forked(*PRETRAIN[:-3], "--shadow_num", "2", "--force", "--no_tensorboard", cwd=folder)
    assert one_error(proc, 1).startswith(f"error: cannot read or write {RUN}/shadow_model_1 (")
    assert snapshot(folder) == before
    assert not [p for p in os.listdir(folder / RUN) if ".partial-" in p]


@pytest.mark.slow
def test_ctrl_c_while_pretraining_publishes_no_model_and_closes_the_log_block(tmp_path):
    """Ctrl-C while shadow 0 trains: the victim had finished, but a pretrain publishes all its models (and a
    new split) or none, so the run folder holds nothing; the log block ends with `Run ended early`."""
    proc = start_script(*pretrain_cmd(100, 1, "--early_stop", "0"), cwd=tmp_path)
    victim_done = lambda: list((tmp_path / RUN).glob("victim_model.partial-*/complete.json"))
    wait_for(victim_done, 900, proc)
    assert victim_done() and proc.poll() is None  # the shadow's 100 epochs have just begun
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert os.listdir(tmp_path / RUN) == []
    log = (tmp_path / "log/digits_columnfc/pretrain.txt").read_text().splitlines()
    assert log[-1] == "Run ended early: interrupted (Ctrl-C)"
    assert log[-2].startswith("Pretrained victim: epoch ")


@pytest.mark.slow
def test_prune_refuses_a_tensorboard_file_and_an_unwritable_folder_before_its_log_header(pretrained, tmp_path):
    folder = copy_run(pretrained, tmp_path)
    (folder / "log/digits_columnfc/tb").write_text("not a folder\n")
    before = snapshot(folder)
    proc = run_forked(*PRUNE, cwd=folder)
    assert one_error(proc, 1).startswith("error: cannot read or write log/digits_columnfc/tb")
    assert snapshot(folder) == before and not (folder / PRUNE_LOG).exists()
    os.symlink(UNWRITABLE, folder / RUN / "shadow_iter_prunetxt_0.6_model_0")
    before = snapshot(folder)
    proc = run_forked(*PRUNE, "--no_tensorboard", cwd=folder)
    assert one_error(proc, 1).startswith(f"error: cannot read or write {RUN}/shadow_iter_prunetxt_0.6_model_0 (")
    assert snapshot(folder) == before and not (folder / PRUNE_LOG).exists()


# ---------------------------------------------------------------- log blocks that end early


def test_main_guard_closes_an_open_log_block_with_its_reason(tmp_path):
    path = str(tmp_path / "x.txt")

    def refused():
        log = RunLog(path)
        log.write("header")
        raise MissingError("a file is missing; make it")

    def returned():
        RunLog(path).write("second header")

    def two_lines():
        RunLog(path).write("third")
        raise UsageError("bad\nflag")

    handler = signal.getsignal(signal.SIGTERM)  # main_guard sets its own
    try:
        with pytest.raises(SystemExit) as exit_:
            main_guard(refused)
        assert exit_.value.code == 1
        main_guard(returned)
        with pytest.raises(SystemExit):
            main_guard(two_lines)
    finally:
        signal.signal(signal.SIGTERM, handler)
    assert open(path).read().splitlines() == [
        "header",
        "Run ended early: a file is missing; make it",
        "second header",
        "Run ended early: the run returned before its last log line",
        "third",
        "Run ended early: bad flag",
    ]
    assert RunLog._open == []


def interrupted_prune(folder, sig):
    """Start a long prune, wait for its block's "Pretrained Victim" line, send sig; (exit status, stderr)."""
    log = folder / PRUNE_LOG
    blocks = lambda: log.read_text().count("Pretrained Victim") if log.exists() else 0
    before = blocks()
    proc = start_script(*PRUNE, "--no_tensorboard", "--prune_epochs", "500", "--early_stop", "0", cwd=folder)
    wait_for(lambda: blocks() != before, 900)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    return proc.returncode, stderr


@pytest.mark.slow
def test_interrupted_and_killed_prunes_are_failed_and_unfinished_rows(pretrained, tmp_path):
    folder = copy_run(pretrained, tmp_path)
    code, stderr = interrupted_prune(folder, signal.SIGTERM)
    assert code == 143, stderr
    assert (folder / PRUNE_LOG).read_text().splitlines()[-1] == "Run ended early: interrupted (SIGTERM)"
    df = results.collect(str(folder / "log"), str(folder / "result")).table
    assert list(df["status"]) == ["failed: interrupted (SIGTERM)"] and df["defend_time_s"].isna().all()
    code, stderr = interrupted_prune(folder, signal.SIGKILL)
    assert code == -9
    df = results.collect(str(folder / "log"), str(folder / "result"), newest_only=False).table
    assert list(df["status"]) == ["failed: interrupted (SIGTERM)", "unfinished"]


BLOCK = (
    "digits_columnfc_iter_prunetxt_0.6_0.0\nSemantics: release\nPretrained Victim: Accuracy 90.000, Loss 0.1\n"
    "Total Base defend time: 1.000s\n"
)
ATTACK = "Victim pruned model test accuracy: 80.000\nShadows: 1 x (base)\nSemantics: release\n"


def test_summarize_shows_ended_blocks_as_failed_and_keeps_the_finished_run(tmp_path):
    """An attack that ended early after an attack that finished: --all shows both with their status; the
    one-row table keeps the finished attack's numbers (a failed run shows only where nothing finished)."""
    log = tmp_path / "log/digits_columnfc/iter_prunetxt_0.6_base.txt"
    log.parent.mkdir(parents=True)
    log.write_text(
        BLOCK + ATTACK + "Conf attack accuracy: 55.000\n" + ATTACK + "Run ended early: interrupted "
        "(SIGTERM)\n"
        + BLOCK.replace(
            "Total Base defend time: 1.000s\n",
            "Run ended early: cannot read or write x (No space left on device); check that path\n",
        )
    )
    every = results.collect(str(tmp_path / "log"), None, newest_only=False).table
    assert sorted(zip(every["setting"].fillna("-"), every["status"], every["Conf_acc"].fillna(-1))) == [
        ("-", "failed: cannot read or write x (No space left on device); check that path", -1),
        ("base", "failed: interrupted (SIGTERM)", -1),
        ("base", "ok", 55.0),
    ]
    table = results.collect(str(tmp_path / "log"), None).table
    assert list(table["status"]) == ["ok"] and list(table["Conf_acc"]) == [55.0]
    alone = tmp_path / "alone/digits_columnfc/iter_prunetxt_0.7_base.txt"
    alone.parent.mkdir(parents=True)
    alone.write_text(BLOCK + ATTACK)  # killed: no closing line, no result
    table = results.collect(str(tmp_path / "alone"), None).table
    assert list(table["status"]) == ["unfinished"]


# ---------------------------------------------------------------- summarize.py's inputs


def summarize(*args, cwd):
    """`python summarize.py args` in cwd, its output as bytes (a forked child: helpers.run_forked)."""
    return run_forked("summarize.py", *args, cwd=cwd, text=False)


@pytest.mark.slow
def test_summarize_refuses_a_missing_or_empty_log_dir(tmp_path):
    log = tmp_path / "log/digits_columnfc/iter_prunetxt_0.6_base.txt"
    log.parent.mkdir(parents=True)
    log.write_text(BLOCK + ATTACK + "Conf attack accuracy: 55.000\n")
    (tmp_path / "empty").mkdir()
    proc = summarize("nolog", cwd=tmp_path)
    assert (proc.returncode, proc.stderr.decode()) == (
        1,
        "error: LOG_DIR nolog not found; pass the folder "
        "prune_modi.py/mia_modi.py log to (default: log), or "
        f"--allow_empty to summarize the run records under "
        f"{tmp_path / 'result'} alone\n",
    )
    proc = summarize("empty", cwd=tmp_path)
    assert proc.returncode == 1 and proc.stderr.decode().startswith("error: LOG_DIR empty holds no results logs")
    assert len(proc.stderr.decode().splitlines()) == 1 and not (tmp_path / "results.csv").exists()
    proc = summarize("empty", "--allow_empty", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert pd.read_csv(tmp_path / "results.csv").empty


@pytest.mark.slow
def test_summarize_lists_every_skipped_log_and_keeps_undecodable_names(tmp_path):
    folder = tmp_path / "log" / "digits_columnfc"
    folder.mkdir(parents=True)
    (folder / "iter_prunetxt_0.6_base.txt").write_text(BLOCK + ATTACK + "Conf attack accuracy: 55.000\n")
    name = os.fsdecode(b"iter_prunetxt_0.7_b\xffse.txt")  # not UTF-8
    (folder / name).write_text(BLOCK + ATTACK + "Conf attack accuracy: 56.000\n")
    os.symlink("nowhere", folder / "iter_prunetxt_0.8_base.txt")
    (folder / "iter_prunetxt_0.9_base.txt").mkdir()
    (folder / "notes.txt").write_text("x\n")
    proc = summarize("log", "--markdown", "--plot", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.decode(errors="surrogateescape").splitlines() == [
        "skipped log/digits_columnfc/iter_prunetxt_0.8_base.txt: a broken link, not a log file",
        "skipped log/digits_columnfc/iter_prunetxt_0.9_base.txt: a folder, not a log file",
        "skipped log/digits_columnfc/notes.txt: name is not <pruner>_<sparsity>_<defend>.txt",
        "wrote 2 rows to results.csv",
        "wrote plot to tradeoff.png",
    ]
    report = summarize("log", "--report", "report", cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    assert "b\ufffdse" in (tmp_path / "report/report.md").read_text()  # the figures' names as they can be drawn
    assert b"b\xffse" in (tmp_path / "results.csv").read_bytes() and b"| b\xffse |" in proc.stdout
    df = pd.read_csv(tmp_path / "results.csv", encoding_errors="surrogateescape")
    assert sorted(df["Conf_acc"]) == [55.0, 56.0] and list(df["status"]) == ["ok", "ok"]


# ---------------------------------------------------------------- mem-scores


@pytest.mark.parametrize(
    "value, message",
    [
        ("1000.5", "row 3 holds 1000.5, outside [-1, 1]"),
        ("-1.5", "row 3 holds -1.5, outside [-1, 1]"),
        (None, "one numeric column named 0"),  # a boolean column
    ],
)
def test_memscores_outside_minus_one_to_one_or_boolean_are_refused(tmp_path, monkeypatch, value, message):
    as_repo(monkeypatch, tmp_path)
    rows = [f"{i},{'True' if value is None else -0.18 if i != 3 else value}\n" for i in range(N_DIGITS_TRAIN)]
    write_csv(tmp_path, ",0\n" + "".join(rows))
    with pytest.raises(MissingError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_memscores(digits_args(), digits_train())
    write_csv(tmp_path, ",0\n" + "".join(f"{i},{-1 if i == 3 else -0.18}\n" for i in range(N_DIGITS_TRAIN)))
    assert load_memscores(digits_args(), digits_train()).min().item() == -1.0  # the bounds are in range

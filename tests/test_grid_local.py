"""grid.py's local backend without a GPU: --jobs_per_gpu slots on a fake GPU list (which step runs on which
GPU, and when), the environment real steps get, and the status line printed per finished step."""

import io
import json
import os

import pytest

import grid
from common import UsageError, main_guard
from conftest import REPO
from gridrun.local import Schedule, Slot, local_slots, run_local
from gridrun.plan import expand
from gridrun.spec import Grid
from gridrun.step import GPU, Step, read_record
from gridrun.tracker import Tracker

RUN = "digits_columnfc"


def digits_steps(monkeypatch, tmp_path):
    """The digits grid without its unpruned attack and control: pretrain, then 4 prunes, each followed by its
    attack."""
    monkeypatch.chdir(REPO)
    with open("grids/digits.json") as f:
        data = {**json.load(f), "original": False, "control": False}
    path = tmp_path / "digits.json"
    path.write_text(json.dumps(data))
    return expand(Grid(str(path), "grids/digits.json"))


def test_slots_are_handed_out_round_robin_over_the_gpus():
    assert local_slots(["3", "5"], 1, 2, cores=8) == [
        Slot("3", 2),
        Slot("5", 2),
        Slot("3", 2),
        Slot("5", 2),
    ]
    assert local_slots(["0"], 1, 3, cores=2) == [Slot("0", 1)] * 3  # at least one thread each
    assert local_slots([], 2, 1, cores=16) == [Slot(None, 8)] * 2
    assert [slot.gpu_id for slot in local_slots(["7"], 1, 1, 4) + local_slots([], 1, 1, 4)] == ["0", "-1"]


def test_steps_share_two_fake_gpus_two_at_a_time(monkeypatch, tmp_path):
    """The digits grid (pretrain, then 4 prunes, each followed by its attack) on GPUs 3 and 5 with 2 steps
    each: what starts (and on which GPU) after each step ends, one prune failing."""
    steps = digits_steps(monkeypatch, tmp_path)
    by_name = {step.name: step for step in steps}
    schedule = Schedule(steps, set(), local_slots(["3", "5"], 1, 2, cores=8))

    def after(name, ok=True):
        if name:
            schedule.finish(by_name[f"{RUN}/{name}"], ok)
        started, skipped = schedule.next()
        per_gpu = [slot.cuda for slot in schedule.running.values()]
        assert all(per_gpu.count(gpu) <= 2 for gpu in ("3", "5"))
        return [(step.name.split("/")[1], slot.cuda) for step, slot in started], [s.name.split("/")[1] for s in skipped]

    p = "iter_prunetxt_0.6"
    assert after(None) == ([("pretrain", "3")], [])
    assert after("pretrain") == (
        [(f"prune.{p}", "5"), (f"prune.{p}_slide_re", "3"), (f"prune.{p}_ml2", "5"), (f"prune.{p}_slide_ml2", "3")],
        [],
    )
    assert after(f"prune.{p}_ml2") == ([(f"attack.{p}_ml2", "5")], [])
    assert after(f"prune.{p}", ok=False) == ([], [f"attack.{p}"])
    assert after(f"prune.{p}_slide_re") == ([(f"attack.{p}_slide_re", "5")], [])
    assert after(f"attack.{p}_ml2") == ([], [])
    assert after(f"prune.{p}_slide_ml2") == ([(f"attack.{p}_slide_ml2", "3")], [])
    for name in (f"attack.{p}_slide_re", f"attack.{p}_slide_ml2"):
        assert after(name) == ([], [])
    assert not schedule.running and not schedule.waiting
    assert schedule.state[f"{RUN}/prune.{p}"] == "failed" and schedule.state[f"{RUN}/attack.{p}"] == "skipped"


def test_real_steps_see_their_gpu_and_thread_share(tmp_path, monkeypatch, capsys):
    """Three tiny real steps on fake GPUs 3 and 5, two per GPU: all start at once on 3, 5, 3, and each sees
    its CUDA_VISIBLE_DEVICES, GPU-ID 0 and cores // 4 threads."""
    monkeypatch.chdir(tmp_path)
    show = "import os, sys; print(os.environ['CUDA_VISIBLE_DEVICES'], os.environ['OMP_NUM_THREADS'], sys.argv[1])"
    steps = [Step(f"run/attack.s{i}", "attack", ["-c", show, GPU], f"log/s{i}.txt") for i in range(3)]
    tracker = run_local(steps, set(), ["3", "5"], 1, retries=0, jobs_per_gpu=2)
    threads = max(1, len(os.sched_getaffinity(0)) // 4)
    seen = [open(step.output("out")).read().split() for step in steps]
    assert seen == [["3", str(threads), "0"], ["5", str(threads), "0"], ["3", str(threads), "0"]]
    assert [read_record(step.record)["cuda_visible_devices"] for step in steps] == ["3", "5", "3"]
    assert tracker.counts == {"done": 3}
    heads = [line.split(" | ")[0].split() for line in capsys.readouterr().err.splitlines() if line.startswith("[")]
    assert [head[:2] for head in heads] == [["[1/3]", "done"], ["[2/3]", "done"], ["[3/3]", "done"]]
    assert sorted(head[2] for head in heads) == [step.name for step in steps]  # they end in any order


def fake_clock(times):
    times = iter(times)
    return lambda: next(times)


def test_status_line_per_finished_step():
    """Counts, elapsed time and an ETA from the mean seconds of finished steps of each kind (of all kinds
    for a kind with none finished), over the slots; on Slurm also the pending jobs."""
    steps = [
        Step(f"r/{name}", kind, [], "log")
        for name, kind in [
            ("pretrain", "pretrain"),
            ("prune.a", "prune"),
            ("prune.b", "prune"),
            ("attack.a", "attack"),
            ("attack.b", "attack"),
        ]
    ]
    out = io.StringIO()
    tracker = Tracker(steps, parallel=2, clock=fake_clock([100.0, 160.0, 200.4, 230.0, 3700.0, 3701.0]), out=out)
    tracker.finish(steps[0], "done", seconds=60.0, running=2)  # left: 2 prune, 2 attack at 60 s each
    tracker.finish(steps[1], "done", seconds=30.0, running=2)  # 1 prune at 30 s, 2 attacks at 45 s
    tracker.finish(steps[3], "failed", "exit 3: boom", running=1)  # 1 prune at 30 s, 1 attack at 45 s
    tracker.finish(steps[2], "done", seconds=90.0, running=0)
    assert out.getvalue().splitlines() == [
        "[1/5] done r/pretrain | 1 done, 0 failed, 0 skipped, 2 running | elapsed 0:01:00 | ETA 0:02:00",
        "[2/5] done r/prune.a | 2 done, 0 failed, 0 skipped, 2 running | elapsed 0:01:40 | ETA 0:01:00",
        "[3/5] failed r/attack.a | 2 done, 1 failed, 0 skipped, 1 running | elapsed 0:02:10 | ETA 0:00:38 | exit 3: "
        "boom",
        "[4/5] done r/prune.b | 3 done, 1 failed, 0 skipped, 0 running | elapsed 1:00:00 | ETA 0:00:30",
    ]
    slurm = Tracker(steps[:2], clock=fake_clock([0.0, 5.0, 9.0]), out=out)
    assert (
        slurm.status(steps[0], "skipped", running=3, pending=4)
        == "[0/2] skipped r/pretrain | 0 done, 0 failed, 0 skipped, 3 running, 4 pending (squeue) | elapsed 0:00:05 | "
        "ETA ?"
    )
    slurm.finish(steps[0], "done", seconds=10.0, running=0, pending=1)  # no job running: the ETA assumes one
    assert (
        out.getvalue().splitlines()[-1]
        == "[1/2] done r/pretrain | 1 done, 0 failed, 0 skipped, 0 running, 1 pending (squeue) | elapsed 0:00:09 | "
        "ETA 0:00:10"
    )
    tracker.finish(steps[4], "done", seconds=1.0, running=0)
    assert out.getvalue().splitlines()[-1].endswith("| ETA 0:00:00")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--jobs_per_gpu", "2"], "--jobs_per_gpu needs --gpus"),
        (["--gpus", "0", "--jobs_per_gpu", "0"], "--jobs_per_gpu must be >= 1"),
        (["--backend", "slurm", "--jobs_per_gpu", "2"], "are --backend local options"),
    ],
)
def test_jobs_per_gpu_is_refused_where_it_means_nothing(argv, message):
    with pytest.raises(UsageError, match=message):
        grid.get_args(["grids/digits.json", *argv])
    assert grid.get_args(["grids/digits.json", "--gpus", "0,1", "--jobs_per_gpu", "3"]).jobs_per_gpu == 3


@pytest.mark.slow  # runs summarize.py
def test_a_failing_summary_is_the_grids_error_and_keeps_the_last_table(tmp_path, monkeypatch, capsys):
    """The grid's last step, summarize.py, failing (here: a log without a run and no run records) ends
    grid.py with one error line naming it and the command to rerun; log/grid/results.md is not emptied."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "log" / RUN).mkdir(parents=True)
    (tmp_path / "log" / RUN / "iter_prunetxt_0.6_base.txt").write_text("garbage\n")
    table = tmp_path / "log" / "grid" / "results.md"
    table.parent.mkdir()
    table.write_text("| the table of the last summary |\n")
    with pytest.raises(SystemExit) as exit_:
        main_guard(lambda: grid.summarize(0, 4))
    assert exit_.value.code == 1
    assert capsys.readouterr().err.splitlines() == [
        f"skipped log/{RUN}/iter_prunetxt_0.6_base.txt: no line of a prune or attack run in it (the format is in "
        f"docs/results.md)",
        f"error: summarize.py failed after the steps (0 ran now, 4 before): no results under log and no run records "
        f"under {tmp_path / 'result'}; run prune_modi.py and mia_modi.py first, or pass the folder they log to; "
        f"once fixed, run python summarize.py log --markdown --plot",
    ]
    assert table.read_text() == "| the table of the last summary |\n"
    assert sorted(os.listdir(table.parent)) == ["results.md"]  # and no temp file


def a_base_run_and_a_garbage_record(tmp_path):
    """log/: one Base prune block and its attack; result/: a run record that is not JSON."""
    (tmp_path / "log" / RUN).mkdir(parents=True)
    (tmp_path / "log" / RUN / "iter_prunetxt_0.6_base.txt").write_text(
        "digits_columnfc_iter_prunetxt_0.6_base_0.0005\nSemantics: corrected\n"
        "Pretrained Victim: Accuracy 81.234, Loss 0.567\nTotal Base defend time: 10.000s\n"
        "Victim pruned model test accuracy: 80.000\nShadows: iter_prunetxt_0.6 (base)\nSemantics: corrected\n"
        "Conf attack accuracy: 55.000\n"
    )
    garbage = tmp_path / "result" / RUN / "records" / "attack_x.json"
    garbage.parent.mkdir(parents=True)
    garbage.write_text("{not json")
    return garbage


@pytest.mark.slow  # runs summarize.py
def test_a_summary_passes_on_the_files_it_left_out(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    garbage = a_base_run_and_a_garbage_record(tmp_path)
    grid.summarize(1, 0)
    err = capsys.readouterr().err.splitlines()
    assert [line for line in err if line.startswith("skipped ")] == [
        f"skipped {garbage}: not valid JSON (Expecting property name enclosed in double quotes at line 1)"
    ]
    assert err[-1] == "results: table in results.csv and log/grid/results.md (Markdown), plot in tradeoff.png"
    assert "| 80.0 |" in (tmp_path / "log" / "grid" / "results.md").read_text()


@pytest.mark.slow  # runs summarize.py
def test_a_table_that_cannot_be_written_is_named_not_its_temp_file(tmp_path, monkeypatch, capsys):
    """results.md is a folder: the error names log/grid/results.md (not the temp file next to it) and leaves
    no temp file."""
    monkeypatch.chdir(tmp_path)
    a_base_run_and_a_garbage_record(tmp_path)
    (tmp_path / "log" / "grid" / "results.md").mkdir(parents=True)
    with pytest.raises(SystemExit) as exit_:
        main_guard(lambda: grid.summarize(1, 0))
    assert exit_.value.code == 1
    assert capsys.readouterr().err.splitlines()[-1] == (
        "error: cannot read or write log/grid/results.md (Is a directory); check that path, its permissions and "
        "the free disk space"
    )
    assert os.listdir(tmp_path / "log" / "grid") == ["results.md"]

import io
import math
import os
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from helpers import is_nan, one_row, run_forked  # noqa: E402
from reporting import figures as report_figures  # noqa: E402
from reporting import results  # noqa: E402

BASE_LOG = """\
digits_columnfc_iter_prunetxt_0.6_0.0005
Pretrained Victim: Accuracy 81.234, Loss 0.567
victim iter 0 best model: Accuracy 80.123, Loss 0.612
victim iter 1 best model: Accuracy 79.500, Loss 0.640
Total Base defend time: 123.41234s
shadow 0 iter 0 best model: Accuracy 79.876, Loss 0.640
epoch 3 progress 50%
Victim pruned model test accuracy: 80.123
Shadows: iter_prunetxt_0.6 (adaptive)
SAMIA attack accuracy: 60.123
Conf attack accuracy: 55.000
Conf attack AUC: 0.5612
Conf attack TPR@1%FPR: 1.234
Conf attack TPR@0.1%FPR: 0.100
Top3-NN attack accuracy: 52.500
NN attack accuracy: 53.000
Victim original model test accuracy: 81.500
Shadows: original
SAMIA attack accuracy: 70.250
Conf attack accuracy: 66.000
digits_columnfc_iter_prunetxt_0.6_0.0005
Semantics: release
Pretrained Victim: Accuracy 81.234, Loss 0.567
victim iter 0 best model: Accuracy 78.000, Loss 0.700
Total Base defend time: 100.5s
Victim pruned model test accuracy: 78.900
Shadows: iter_prunetxt_0.6 (adaptive)
Semantics: release
SAMIA attack accuracy: 58.000
Conf attack accuracy: 54.000
"""

PPB_LOG = """\
digits_columnfc_iter_prunetxt_0.6_ppb_4.0_0.0005
Pretrained Victim: Accuracy 81.234, Loss 0.567
victim iter 0 best model: Accuracy 77.000, Loss 0.800
Total ppb defend time: 12.5s
Victim pruned model test accuracy: 76.500
Shadows: iter_prunetxt_0.6_ppb_4.0 (adaptive)
SAMIA attack accuracy: 51.000
LiRA attack accuracy: 52.000
LiRA attack TPR@0.1%FPR: 0.300
"""

# Prune block only, killed mid-line while the shadows were training.
PARTIAL_LOG = """\
digits_columnfc_iter_prunetxt_0.6_slide_re_1-15_0.1
Pretrained Victim: Accuracy 81.234, Loss 0.567
victim iter 0 best model: Accuracy 79.000, Loss 0.650
Total slide_re defend time: 30s
shadow 0 iter 0 best model: Accur"""

DP_LOG = """\
digits_columnfc_iter_prunetxt_0.6_dp_0.1_0.0005
Pretrained Victim: Accuracy 81.234, Loss 0.567
victim iter 0 best model: Accuracy 60.000, Loss 1.200
DP epsilon: 1.500 (delta 1e-5)
victim iter 1 best model: Accuracy 58.000, Loss 1.300
DP epsilon: 3.250 (delta 1e-5)
Total dp defend time: 40.0s
shadow 0 iter 0 best model: Accuracy 55.000, Loss 1.400
DP epsilon: 9.900 (delta 1e-5)
Victim pruned model test accuracy: 57.000
Shadows: iter_prunetxt_0.6 (base)
Conf attack accuracy: 50.500
"""

P = "2024-01-01 10:00:00,123 - INFO - "
RELEASE_LOG = f"""\
{P}cifar10_resnet18_iter_pruning_0.6_0.0005
{P}Pretrained Victim: Accuracy 93.100, Loss 0.300
{P}victim iter 0 best model: Accuracy 92.000, Loss 0.310
{P}Total Base defend time: 1000.0s
{P}Victim pruned model test accuracy: 91.800
{P}SAMIA attack accuracy: 71.000
{P}Conf attack accuracy: 65.500
{P}NN attack accuracy 61.200
{P}Top3-NN Attack Accuracy 60.0
{P}NNCl Attack Accuracy 59.87654321
"""


def prune_block(name, semantics, *lines):
    """A prune block's first lines: its name, semantics, the pretrained victim, then `lines`."""
    return "\n".join([name, f"Semantics: {semantics}", "Pretrained Victim: Accuracy 81.234, Loss 0.567", *lines]) + "\n"


def attack_block(semantics, conf, victim="80.000"):
    """One attack with Base-pruned shadows: the victim's test accuracy, the shadows, semantics and Conf."""
    lines = [f"Victim pruned model test accuracy: {victim}", "Shadows: iter_prunetxt_0.6 (base)"]
    return "\n".join([*lines, f"Semantics: {semantics}", f"Conf attack accuracy: {conf}"]) + "\n"


# Release and corrected runs in one file: a Base prune block attacked in both modes, then a dp run
# pruned and attacked with --semantics corrected, then a corrected dp prune block not attacked yet.
SEMANTICS_BASE_LOG = (
    prune_block("digits_columnfc_iter_prunetxt_0.6_0.0005", "release", "Total Base defend time: 10.000s")
    + attack_block("release", "55.000")
    + attack_block("corrected", "55.500")
    + attack_block("release", "56.000")
)
DP_0_1 = "digits_columnfc_iter_prunetxt_0.6_dp_0.1"
SEMANTICS_DP_LOG = (
    prune_block(f"{DP_0_1}_0.0005", "release", "DP epsilon: 1.500 (delta 1e-5)", "Total dp defend time: 40.000s")
    + attack_block("release", "50.500", victim="57.000")
    + prune_block(
        f"{DP_0_1}_corrected_0.0005", "corrected", "DP epsilon: 20.000 (delta 1e-5)", "Total dp defend time: 400.000s"
    )
    + attack_block("corrected", "52.000", victim="68.000")
    + prune_block(
        f"{DP_0_1}_corrected_0.0005", "corrected", "DP epsilon: 30.000 (delta 1e-5)", "Total dp defend time: 410.000s"
    )
)


@pytest.fixture
def log_dir(tmp_path):
    logs = {
        "digits_columnfc/iter_prunetxt_0.6_base.txt": BASE_LOG,
        "digits_columnfc/iter_prunetxt_0.6_ppb.txt": PPB_LOG,
        "digits_columnfc/iter_prunetxt_0.6_slide_re.txt": PARTIAL_LOG,
        "digits_columnfc/iter_prunetxt_0.6_dp.txt": DP_LOG,
        "digits_columnfc/pretrain.txt": "Pretrained Victim: Accuracy 1.000, Loss 9.000\n",
        "digits_columnfc/notes.md": BASE_LOG,
        "digits_columnfc/tb/iter_prunetxt_0.6_base.txt": BASE_LOG,
        "tb/iter_prunetxt_0.6_base.txt": BASE_LOG,
        "cifar10_resnet18/iter_pruning_0.6_.txt": RELEASE_LOG,
    }
    for i, (name, text) in enumerate(logs.items()):
        path = tmp_path / "log" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        os.utime(path, (1_000_000 + i, 1_000_000 + i))
    return tmp_path / "log"


def run_cli(*args, cwd):
    """`python summarize.py args` in cwd (a forked child of the tests' script server: helpers.run_forked)."""
    return run_forked("summarize.py", *args, cwd=cwd)


def test_tags_and_seeds_are_rows_of_their_own(tmp_path):
    """Two window settings of one defense (tagged) and a second seed: three rows, none overwritten."""
    block = lambda header, acc: (
        f"{header}\nSemantics: release\nPretrained Victim: Accuracy 90.000, Loss 0.1\n"
        f"Victim pruned model test accuracy: {acc}\nShadows: x (adaptive)\n"
        f"Semantics: release\nConf attack accuracy: 55.000\n"
    )
    logs = {
        "digits_columnfc/iter_prunetxt_0.6_slide_re_tag-s1w15.txt": block(
            "digits_columnfc_iter_prunetxt_0.6_slide_re_tag-s1w15_1-15_0.0005", "81.000"
        ),
        "digits_columnfc/iter_prunetxt_0.6_slide_re_tag-s2w10.txt": block(
            "digits_columnfc_iter_prunetxt_0.6_slide_re_tag-s2w10_2-10_0.0005", "82.000"
        ),
        "digits_columnfc_seed3/iter_prunetxt_0.6_slide_re.txt": block(
            "digits_columnfc_seed3_iter_prunetxt_0.6_slide_re_1-15_0.0005", "83.000"
        ),
    }
    for name, text in logs.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    df = results.parse_logs(tmp_path)
    got = sorted(zip(df["model"], df["defense"], df["tag"], df["seed"], df["window"], df["pruned_acc"]))
    assert got == [
        ("columnfc", "slide_re", "", 3, "1-15", 83.0),
        ("columnfc", "slide_re", "s1w15", 7, "1-15", 81.0),
        ("columnfc", "slide_re", "s2w10", 7, "2-10", 82.0),
    ]


def test_columns_and_rows(log_dir):
    df = results.parse_logs(log_dir)
    # Only attack columns with a value in the merged rows (the old Base run's Conf AUC/TPR are gone: the newest
    # Conf result has none; its NN results stay, no newer run has any).
    assert list(df.columns) == results.COLUMNS + [
        "SAMIA_acc",
        "Conf_acc",
        "NN_acc",
        "Top3-NN_acc",
        "NNCl_acc",
        "LiRA_acc",
        "LiRA_tpr01",
    ]
    assert results.COLUMNS[8:13] == ["setting", "semantics", "tag", "seed", "pretrained_acc"]
    assert set(df["tag"]) == {""} and set(df["seed"]) == {7}  # untagged runs of the default seed
    assert list(results.parse_logs(log_dir, newest_only=False).columns) == results.COLUMNS + [
        "SAMIA_acc",
        "Conf_acc",
        "Conf_auc",
        "Conf_tpr1",
        "Conf_tpr01",
        "NN_acc",
        "Top3-NN_acc",
        "NNCl_acc",
        "LiRA_acc",
        "LiRA_tpr01",
    ]
    assert set(df["semantics"]) == {"release"}  # logs without "Semantics:" lines are the release's
    got = set(zip(df["dataset"], df["model"], df["defense"], df["setting"].fillna("-")))
    assert got == {
        ("digits", "columnfc", "base", "base"),
        ("digits", "columnfc", "base", "original"),
        ("digits", "columnfc", "ppb", "adaptive"),
        ("digits", "columnfc", "slide_re", "-"),
        ("digits", "columnfc", "dp", "base"),
        ("cifar10", "resnet18", "base", "unknown"),
    }
    # Base first within a dataset_model.
    assert list(df[df["dataset"] == "digits"]["defense"])[:2] == ["base", "base"]


def test_base_newest_and_original(log_dir):
    """BASE_LOG is an older version's: its "(adaptive)" attacks on Base are the base setting."""
    df = results.parse_logs(log_dir)
    newest = one_row(df, dataset="digits", defense="base", setting="base")
    assert newest["pruner"] == "iter_prunetxt" and newest["sparsity"] == 0.6
    assert newest["pretrained_acc"] == 81.234 and newest["pruned_acc"] == 78.9
    assert newest["defend_time_s"] == 100.5 and newest["weight_decay_mem"] == 0.0005
    assert newest["SAMIA_acc"] == 58.0 and newest["Conf_acc"] == 54.0 and "Conf_auc" not in df  # none in the newest
    assert math.isnan(newest["Top3-NN_acc"]) and math.isnan(newest["NN_acc"])  # they attacked a replaced model
    assert is_nan(newest["defend_arg"]) and is_nan(newest["window"])
    original = one_row(df, dataset="digits", defense="base", setting="original")
    assert original["pretrained_acc"] == 81.5 and is_nan(original["pruned_acc"])
    assert original["SAMIA_acc"] == 70.25 and original["Conf_acc"] == 66.0
    assert original["defend_time_s"] == 123.41234


def test_all_keeps_every_entry(log_dir):
    df = results.parse_logs(log_dir, newest_only=False)
    base = df[(df["dataset"] == "digits") & (df["defense"] == "base")]
    assert list(base["setting"]) == ["base", "base", "original"]
    old = base.iloc[0]  # oldest first among equal keys
    assert old["pruned_acc"] == 80.123 and old["SAMIA_acc"] == 60.123
    assert old["Conf_auc"] == 0.5612 and old["Conf_tpr1"] == 1.234 and old["Conf_tpr01"] == 0.1
    assert old["NN_acc"] == 53.0 and old["Top3-NN_acc"] == 52.5
    assert len(df) == 7
    release = one_row(df, dataset="cifar10")  # no AUC/TPR lines in the release's logs
    assert release["Conf_acc"] == 65.5 and is_nan(release["Conf_auc"]) and is_nan(release["Conf_tpr1"])


def test_defended_partial_dp_and_release_rows(log_dir):
    df = results.parse_logs(log_dir)
    ppb = one_row(df, defense="ppb")
    assert ppb["defend_arg"] == 4.0 and ppb["defend_time_s"] == 12.5 and ppb["pruned_acc"] == 76.5
    assert ppb["SAMIA_acc"] == 51.0 and ppb["LiRA_acc"] == 52.0 and ppb["LiRA_tpr01"] == 0.3
    assert is_nan(ppb["dp_epsilon"])

    partial = one_row(df, defense="slide_re")
    assert is_nan(partial["setting"]) and partial["window"] == "1-15" and partial["weight_decay_mem"] == 0.1
    assert partial["defend_time_s"] == 30.0 and partial["pretrained_acc"] == 81.234
    assert is_nan(partial["defend_arg"]) and is_nan(partial["pruned_acc"]) and is_nan(partial["SAMIA_acc"])

    dp = one_row(df, defense="dp")
    assert dp["defend_arg"] == 0.1 and dp["dp_epsilon"] == 3.25  # the victim's last, not a shadow's
    assert dp["setting"] == "base" and dp["pruned_acc"] == 57.0 and dp["Conf_acc"] == 50.5

    release = one_row(df, dataset="cifar10")
    assert release["model"] == "resnet18" and release["pruner"] == "iter_pruning"
    assert release["defense"] == "base" and release["setting"] == "unknown"
    assert release["pretrained_acc"] == 93.1 and release["pruned_acc"] == 91.8
    assert release["defend_time_s"] == 1000.0 and release["SAMIA_acc"] == 71.0
    assert release["Conf_acc"] == 65.5 and release["Top3-NN_acc"] == 60.0 and is_nan(release["LiRA_acc"])
    assert release["NN_acc"] == 61.2 and release["NNCl_acc"] == 59.87654321 and release["SAMIA_acc"] == 71.0
    assert release["semantics"] == "release"


def test_release_and_corrected_runs_are_separate_rows(tmp_path):
    folder = tmp_path / "log" / "digits_columnfc"
    folder.mkdir(parents=True)
    (folder / "iter_prunetxt_0.6_base.txt").write_text(SEMANTICS_BASE_LOG)
    (folder / "iter_prunetxt_0.6_dp.txt").write_text(SEMANTICS_DP_LOG)
    every = results.parse_logs(tmp_path / "log", newest_only=False)
    assert list(every["semantics"]) == ["corrected", "release", "release", "corrected", "corrected", "release"]
    assert list(every["Conf_acc"].fillna(-1)) == [55.5, 55.0, 56.0, -1, 52.0, 50.5]  # no setting first

    df = results.parse_logs(tmp_path / "log")
    assert len(df) == 4
    # An attack's own line sets its semantics, whatever its prune block's was (Base prunes alike in both).
    assert one_row(df, defense="base", semantics="release")["Conf_acc"] == 56.0
    assert one_row(df, defense="base", semantics="corrected")["Conf_acc"] == 55.5
    assert one_row(df, defense="dp", semantics="release")["dp_epsilon"] == 1.5
    # The corrected dp run was pruned again after its attack: its row holds the newest prune block's numbers
    # and semantics, and no attack's (that one read the replaced model).
    stale = one_row(df, defense="dp", semantics="corrected")
    assert stale["setting"] == "base" and stale["status"] == results.STALE and stale["defend_arg"] == 0.1
    assert stale["dp_epsilon"] == 30.0 and stale["defend_time_s"] == 410.0
    assert is_nan(stale["Conf_acc"]) and is_nan(stale["pruned_acc"])


def test_newest_across_files_by_mtime(tmp_path):
    folder = tmp_path / "log" / "digits_columnfc"
    folder.mkdir(parents=True)
    block = "Victim pruned model test accuracy: {}\nShadows: l1_0.5 (base)\nConf attack accuracy: {}\n"
    (folder / "l1_0.5_base.txt").write_text(block.format(70.0, 60.0))
    (folder / "l1_0.5_.txt").write_text(block.format(71.0, 61.0))
    os.utime(folder / "l1_0.5_base.txt", (2_000_000, 2_000_000))
    os.utime(folder / "l1_0.5_.txt", (1_000_000, 1_000_000))
    df = results.parse_logs(tmp_path / "log")
    assert len(df) == 1 and df.loc[0, "pruned_acc"] == 70.0 and df.loc[0, "Conf_acc"] == 60.0
    assert df.loc[0, "pruner"] == "l1" and df.loc[0, "sparsity"] == 0.5
    assert list(results.parse_logs(tmp_path / "log", newest_only=False)["pruned_acc"]) == [71.0, 70.0]


def test_repeated_metric_without_victim_line_is_a_new_entry(tmp_path):
    folder = tmp_path / "log" / "location_columnfc"
    folder.mkdir(parents=True)
    (folder / "iter_prunetxt_0.7_.txt").write_text(
        "SAMIA attack accuracy: 60.000\nSAMIA attack accuracy: 61.000\nSAMIA attack accu"
    )
    df = results.parse_logs(tmp_path / "log", newest_only=False)
    assert list(df["SAMIA_acc"]) == [60.0, 61.0] and list(df["setting"]) == ["unknown", "unknown"]
    assert one_row(results.parse_logs(tmp_path / "log"), dataset="location")["SAMIA_acc"] == 61.0


@pytest.mark.slow
def test_cli_csv_and_markdown(log_dir, tmp_path):
    out = tmp_path / "r.csv"
    proc = run_cli(log_dir, "--out", out, "--markdown", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    csv = pd.read_csv(out)
    expected = results.parse_logs(log_dir)
    assert len(csv) == 6 and list(csv.columns) == list(expected.columns)
    pd.testing.assert_series_equal(csv["SAMIA_acc"], expected["SAMIA_acc"])
    assert one_row(csv, defense="dp")["dp_epsilon"] == 3.25

    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("| dataset | model | pruner | sparsity | defense | defend_arg |")
    assert lines[1] == "|" + "---|" * len(expected.columns)
    assert len(lines) == 2 + 6
    ppb_line = next(line for line in lines if "| ppb |" in line)
    assert ppb_line.startswith(
        "| digits | columnfc | iter_prunetxt | 0.6 | ppb | 4.0 |  | 0.0005 | adaptive | release |  | 7 | 81.234 |"
    )

    proc = run_cli(log_dir, "--out", out, "--all", cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout == "" and len(pd.read_csv(out)) == 7


@pytest.mark.slow
def test_cli_plot(log_dir, tmp_path):
    png = tmp_path / "tradeoff.png"
    proc = run_cli(log_dir, "--out", tmp_path / "r.csv", "--plot", png, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tradeoff_plot_data(log_dir):
    """What the figure shows, read back from matplotlib's objects: per panel one marker per defense at
    (pruned accuracy, strongest attack accuracy) of the newest run, Base as the black star, the unpruned
    victim as a dashed line and its attack as an X."""
    import matplotlib.pyplot as plt

    fig = report_figures.draw_tradeoff(results.parse_logs(log_dir))
    panels = {ax.get_title(): ax for ax in fig.axes if ax.get_visible()}
    assert sorted(panels) == ["cifar10_resnet18", "digits_columnfc"]
    ax = panels["digits_columnfc"]
    points = {c.get_label(): [tuple(p) for p in c.get_offsets()] for c in ax.collections}
    assert points == {
        "Base": [(78.9, 58.0)],
        "dp": [(57.0, 50.5)],
        "ppb": [(76.5, 52.0)],
        "unpruned, attacked": [(81.5, 70.25)],
    }  # slide_re has no attack yet: no marker
    base = next(c for c in ax.collections if c.get_label() == "Base")
    assert tuple(base.get_facecolor()[0][:3]) == (0.0, 0.0, 0.0)
    (line,) = ax.get_lines()
    assert line.get_linestyle() == "--" and list(line.get_xdata()) == [81.5, 81.5]
    assert line.get_label() == "unpruned (81.5%)"
    assert [t.get_text() for t in ax.texts] == ["0.1", "4"]  # defend_arg next to dp and ppb (sorted by defense)
    assert ax.get_xlabel() == "pruned victim test accuracy (%), axis zoomed"  # autoscaled, not from 0
    assert ax.get_ylabel() == "strongest attack accuracy (%)" and ax.get_ylim()[0] == 50  # from chance
    assert [tuple(p) for p in panels["cifar10_resnet18"].collections[0].get_offsets()] == [(91.8, 71.0)]
    plt.close(fig)


@pytest.mark.slow
def test_cli_missing_or_empty_dir(tmp_path):
    proc = run_cli(tmp_path / "nope", cwd=tmp_path)
    assert proc.returncode == 1 and "not found" in proc.stderr
    (tmp_path / "empty").mkdir()
    proc = run_cli(tmp_path / "empty", cwd=tmp_path)
    assert proc.returncode == 1 and "no results logs" in proc.stderr
    assert not (tmp_path / "results.csv").exists()


@pytest.mark.slow
def test_cli_plot_without_a_file_name_writes_tradeoff_png(log_dir, tmp_path):
    proc = run_cli(log_dir, "--markdown", "--plot", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "tradeoff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert proc.stdout.startswith("| dataset | model |")


def test_scores_line_names_the_runs_scores_file_and_nothing_else(tmp_path):
    """mia_modi.py ends an attack block with "Scores: <file>": it fills the scores column, misread as nothing."""
    folder = tmp_path / "log" / "digits_columnfc"
    folder.mkdir(parents=True)
    scores = "result/digits_columnfc/scores/iter_prunetxt_0.6_base_release_20250101T000000000000Z_h_1.npz"
    (folder / "iter_prunetxt_0.6_base.txt").write_text(BASE_LOG.split("Victim original")[0] + f"Scores: {scores}\n")
    df = results.parse_logs(tmp_path / "log", newest_only=False)
    assert list(df.columns) == results.COLUMNS + [
        "SAMIA_acc",
        "Conf_acc",
        "Conf_auc",
        "Conf_tpr1",
        "Conf_tpr01",
        "NN_acc",
        "Top3-NN_acc",
        "scores",
    ]
    assert len(df) == 1 and df.loc[0, "scores"] == scores and df.loc[0, "NN_acc"] == 53.0


# ---------------------------------------------------------------- summarize.py's errors


def refused(proc, status, line):
    """The command failed with exit status `status` and one line on stderr, `error: <line>`."""
    assert "Traceback" not in proc.stderr
    assert proc.stderr.splitlines() == [f"error: {line}"]
    assert proc.returncode == status and proc.stdout == ""


def untouched(tmp_path):
    """Output files of an earlier run, which a refused command must leave as they are."""
    old = {
        "results.csv": "old table\n",
        "tradeoff.png": "old plot\n",
        "report/results.csv": "old report table\n",
        "report/report.md": "old report\n",
    }
    for name, text in old.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    return lambda: {name: (tmp_path / name).read_text() for name in old} == old and not list(tmp_path.glob("**/.tmp_*"))


@pytest.mark.slow
def test_cli_missing_output_folder(log_dir, tmp_path):
    unchanged = untouched(tmp_path)
    for flag, path in (("--out", "nowhere/x.csv"), ("--plot", "nowhere/x.png"), ("--report", "nowhere/rep")):
        extra = ["--report", path] if flag == "--report" else ["--plot", "tradeoff.png"] + [flag, path]
        refused(
            run_cli(log_dir, *extra, cwd=tmp_path),
            1,
            f"folder nowhere for {flag} {path} not found; create it first, or pass a path in an existing folder",
        )
    assert unchanged() and not (tmp_path / "nowhere").exists()


@pytest.mark.slow
def test_cli_file_in_place_of_the_output_folder(log_dir, tmp_path):
    unchanged = untouched(tmp_path)
    (tmp_path / "blocker").write_text("not a folder\n")
    for flag in ("--out", "--plot", "--report"):
        path = f"blocker/{'x.csv' if flag == '--out' else 'x.png' if flag == '--plot' else 'rep'}"
        refused(
            run_cli(log_dir, "--plot", "tradeoff.png", flag, path, cwd=tmp_path),
            1,
            f"blocker for {flag} {path} is a file, not a folder; move that file away, or pass a path in a folder",
        )
    assert unchanged() and (tmp_path / "blocker").read_text() == "not a folder\n"


@pytest.mark.slow
def test_cli_unwritable_output_folder(log_dir, tmp_path):
    """A folder without write permission; as root (who writes anywhere chmod allows) a /proc folder, which
    nobody can create files in."""
    unchanged = untouched(tmp_path)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    folder = "/proc/1" if os.geteuid() == 0 else "locked"
    try:
        refused(
            run_cli(log_dir, "--out", f"{folder}/x.csv", cwd=tmp_path),
            1,
            f"folder {folder} for --out {folder}/x.csv is not writable; fix its permissions, or pass a path in a "
            "folder you can write to",
        )
    finally:
        locked.chmod(0o700)
    assert unchanged() and list(locked.iterdir()) == []


@pytest.mark.slow
def test_cli_output_path_of_the_wrong_kind(log_dir, tmp_path):
    unchanged = untouched(tmp_path)
    (tmp_path / "folder").mkdir()
    (tmp_path / "figures.png").mkdir()
    refused(
        run_cli(log_dir, "--out", "folder", cwd=tmp_path),
        2,
        "--out folder is a folder; pass a file name, e.g. --out folder/results.csv",
    )
    refused(
        run_cli(log_dir, "--plot", "figures.png", cwd=tmp_path),
        2,
        "--plot figures.png is a folder; pass a file name, e.g. --plot figures.png/tradeoff.png",
    )
    refused(
        run_cli(log_dir, "--report", "results.csv", cwd=tmp_path),
        2,
        "--report results.csv is a file, not a folder; pass a folder name (it is created if missing)",
    )
    proc = run_cli(log_dir, "--plot", "plot.txt", cwd=tmp_path)
    assert proc.stderr.startswith("error: --plot plot.txt: matplotlib cannot write .txt files; use one of ")
    refused(proc, 2, proc.stderr.strip()[len("error: ") :])
    assert ".png" in proc.stderr and ".pdf" in proc.stderr
    refused(
        run_cli(log_dir, "--no_such_flag", cwd=tmp_path),
        2,
        "unrecognized arguments: --no_such_flag; see 'summarize.py --help'",
    )
    assert unchanged() and list((tmp_path / "folder").iterdir()) == list((tmp_path / "figures.png").iterdir()) == []


@pytest.mark.slow
def test_cli_log_dir_that_is_a_file_or_holds_no_results(tmp_path):
    unchanged = untouched(tmp_path)
    (tmp_path / "notes.txt").write_text("not a folder\n")
    refused(
        run_cli("notes.txt", cwd=tmp_path),
        2,
        "LOG_DIR notes.txt is a file, not a folder; pass the folder that holds the <ds>_<model>/ log folders "
        "(default: log)",
    )
    refused(
        run_cli("log", "--result_dir", "notes.txt", cwd=tmp_path),
        2,
        "--result_dir notes.txt is a file, not a folder; pass the folder that holds <ds>_<model>/records/ "
        "(default: result/ beside LOG_DIR)",
    )
    (tmp_path / "empty").mkdir()
    for extra in ([], ["--report", "report"]):
        refused(
            run_cli("empty", *extra, cwd=tmp_path),
            1,
            f"LOG_DIR empty holds no results logs (<ds>_<model>/<pruner>_<sparsity>_<defend>.txt); pass the "
            f"folder prune_modi.py/mia_modi.py log to, or --allow_empty to summarize the run records under "
            f"{tmp_path / 'result'} alone",
        )
    refused(
        run_cli("empty", "--allow_empty", "--report", "report", cwd=tmp_path),
        1,  # a report of nothing
        f"no results under empty and no run records under {tmp_path / 'result'}; run prune_modi.py and "
        f"mia_modi.py first, or pass the folder they log to",
    )
    refused(
        run_cli("nope", cwd=tmp_path),
        1,
        f"LOG_DIR nope not found; pass the folder prune_modi.py/mia_modi.py log to (default: log), or --allow_empty "
        f"to summarize the run records under {tmp_path / 'result'} alone",
    )
    assert unchanged()


@pytest.mark.slow
def test_cli_replaces_its_outputs_whole(log_dir, tmp_path):
    """A run that succeeds replaces the earlier files (renamed over them) and leaves no temporary file."""
    untouched(tmp_path)
    proc = run_cli(log_dir, "--out", "results.csv", "--plot", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines() == ["wrote 6 rows to results.csv", "wrote plot to tradeoff.png"]
    pd.testing.assert_frame_equal(
        pd.read_csv(tmp_path / "results.csv"), pd.read_csv(io.StringIO(results.parse_logs(log_dir).to_csv(index=False)))
    )
    assert (tmp_path / "tradeoff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    proc = run_cli(log_dir, "--plot", "plot", cwd=tmp_path)  # no extension: PNG, as matplotlib names it
    assert proc.returncode == 0 and (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob("**/.tmp_*"))

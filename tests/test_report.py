"""Per-sample scores, run records and `summarize.py --report` on a small digits run and on synthetic records.

One module-scoped run (pretrain; Base at sparsity 0.6 and 0.5; slide_re with two window settings, tagged;
attacks threshold,lira) serves every test that needs real outputs. The scripts run as subprocesses, two
at a time where they do not depend on each other.
"""

import json
import math
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_curve

import attacks
import records
from conftest import REPO, run_script, write_run_record
from helpers import run_forked, run_scripts
from reporting import figures as report_figures
from reporting import results
from reporting import tables as report_tables
from reporting.tables import run_label

CONFIG = os.path.join(REPO, "config", "digits.json")
RUN = "digits_columnfc"
QUIET = ["--quiet", "--no_tensorboard", "--shadow_num", 1]
PRUNE = ["--pruner_name", "iter_prunetxt", "--prune_iter", 2, "--prune_epochs", 2, *QUIET]
ATTACK = ["--pruner_name", "iter_prunetxt", "--attacks", "threshold,lira", *QUIET]
WINDOWS = {"s1w15": (1, 15), "s2w10": (2, 10)}
LABELS = {"Base", "slide_re [s1w15]", "slide_re [s2w10]"}  # the runs at sparsity 0.6


def in_parallel(cwd, *lanes):
    """Each lane (a list of commands) in one process of its own (helpers.run_scripts), two lanes at a time."""
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda commands: run_scripts(*commands, cwd=cwd), lanes))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("report")
    shutil.copytree(os.path.join(REPO, "memscore"), cwd / "memscore")
    run_script("pretrain_modi.py", -1, CONFIG, "--epochs", 2, *QUIET, cwd=cwd)
    window = lambda tag: ["--defend", "slide_re", "--stride", WINDOWS[tag][0], "--width", WINDOWS[tag][1], "--tag", tag]
    sparsity = ["--prune_sparsity", 0.5]
    base = [("prune_modi.py", -1, CONFIG, *PRUNE), ("prune_modi.py", -1, CONFIG, *PRUNE, *sparsity)]
    base += [("mia_modi.py", -1, CONFIG, *ATTACK), ("mia_modi.py", -1, CONFIG, *ATTACK, *sparsity)]
    windows = [("prune_modi.py", -1, CONFIG, *PRUNE, *window(tag)) for tag in WINDOWS]
    windows += [
        ("mia_modi.py", -1, CONFIG, *ATTACK, "--defend", "slide_re", "--adaptive", "--tag", tag) for tag in WINDOWS
    ]
    in_parallel(cwd, base, windows)
    return cwd


@pytest.fixture(scope="module")
def collected(run_dir):
    return results.collect(run_dir / "log", run_dir / "result")


def attack_blocks(log):
    """(lines of each attack block, the scores file it names) of a log, in order."""
    lines = log.read_text().splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("Victim ")]
    blocks = [lines[a:b] for a, b in zip(starts, starts[1:] + [len(lines)])]
    return [(block, next(line[len("Scores: ") :] for line in block if line.startswith("Scores: "))) for block in blocks]


def all_attack_blocks(run_dir):
    return [item for log in sorted((run_dir / "log" / RUN).glob("iter_prunetxt_*.txt")) for item in attack_blocks(log)]


# ---------------------------------------------------------------- scores and records of a real run


@pytest.mark.slow
def test_saved_scores_reproduce_the_logged_metrics(run_dir):
    blocks = all_attack_blocks(run_dir)
    assert len(blocks) == 4
    split = np.load(run_dir / "result" / RUN / "split.npz")
    n_train = int(split["meta_n_train"])
    for block, path in blocks:
        assert sum(line.startswith("Scores: ") for line in block) == 1
        assert re.fullmatch(
            rf"result/{RUN}/scores/iter_prunetxt_0\.[56]\S*_(base|adaptive)_release_\d{{8}}T\d{{12}}Z_"
            r"[\w-]+_\d+\.npz",
            path,
        )
        with np.load(run_dir / path, allow_pickle=False) as z:
            assert list(z["attacks"]) == ["Conf", "Entr", "Mentr", "Hconf", "LiRA"]
            member = z["member"]
            for name in z["attacks"]:
                auc, tpr_at = attacks.roc_metrics(z[f"score_{name}"], member)
                expected = [
                    f"{name} attack AUC: {auc:.4f}",
                    f"{name} attack TPR@1%FPR: {tpr_at[0.01]:.3f}",
                    f"{name} attack TPR@0.1%FPR: {tpr_at[0.001]:.3f}",
                ]
                at = block.index(next(line for line in block if line.startswith(f"{name} attack accuracy: ")))
                assert block[at + 1 : at + 4] == expected
            lira = attacks.best_balanced_accuracy(z["score_LiRA"], member)
            assert f"LiRA attack accuracy: {lira:.3f}" in block
            # which samples: the victim's members, then its non-members, in the split's index space
            assert np.array_equal(z["index"], np.concatenate([split["victim_train"], split["victim_test"]]))
            assert np.array_equal(member, np.arange(len(member)) < len(split["victim_train"]))
            in_train = z["index"] < n_train
            assert list(np.unique(z["set"][in_train])) == ["train"] and set(z["set"][~in_train]) == {"test"}
            assert np.array_equal(z["set_index"], np.where(in_train, z["index"], z["index"] - n_train))


@pytest.mark.slow
def test_records_hold_the_log_blocks_numbers(run_dir, collected):
    assert collected.problems == []
    by_kind = {kind: [r for r in collected.records if r["kind"] == kind] for kind in ("prune", "attack")}
    assert len(by_kind["prune"]) == 4 and len(by_kind["attack"]) == 4
    for record in collected.records:
        log = (run_dir / record["log"]["path"]).read_bytes()
        block = log[record["log"]["offset"] : record["log"]["end"]].decode().splitlines()
        assert record["code"]["commit"] is None or re.fullmatch(r"[0-9a-f]{40}", record["code"]["commit"])
        assert record["start"] <= record["end"] and record["run"]["seed"] == 7
        assert record["settings"]["shadow_num"] == 1 and record["settings"]["quiet"] is True
        results = record["results"]
        if record["kind"] == "prune":
            assert block[0].startswith(f"{RUN}_iter_prunetxt_0.")
            assert (
                f"Pretrained Victim: Accuracy {results['pretrained']['accuracy']:.3f}, "
                f"Loss {results['pretrained']['loss']:.3f}" in block
            )
            for who, iterations in results["iterations"].items():
                logged = [line for line in block if line.startswith(f"{who} iter")]
                assert logged == [
                    f"{who} iter {t} best model: Accuracy {it['accuracy']:.3f}, Loss {it['loss']:.3f}"
                    for t, it in enumerate(iterations)
                ]
            assert sorted(results["iterations"]) == ["shadow 0", "victim"]
            assert any(line.endswith(f"defend time: {results['defend_time_s']:.3f}s") for line in block)
            assert record["run"]["window"] == (
                "-".join(map(str, WINDOWS[record["run"]["tag"]])) if record["run"]["tag"] else None
            )
        else:
            assert block[0] == f"Victim pruned model test accuracy: {results['victim_test_acc']:.3f}"
            assert block[1] == f"Shadows: {results['shadows']}" and block[-1] == f"Scores: {record['scores']}"
            for attack in results["attacks"]:
                name = attack["name"]
                assert f"{name} attack accuracy: {attack['accuracy']:.3f}" in block
                assert f"{name} attack AUC: {attack['AUC']:.4f}" in block
                assert f"{name} attack TPR@0.1%FPR: {attack['TPR@0.1%FPR']:.3f}" in block
                low, high = attack["intervals"]["accuracy"]  # LiRA's too: its best balanced accuracy
                assert set(attack["intervals"]) == {"accuracy", "AUC", "TPR@1%FPR", "TPR@0.1%FPR"}
                assert low <= attack["accuracy"] <= high and attack["intervals"]["AUC"][0] <= attack["AUC"]


@pytest.mark.slow
def test_a_run_is_one_row_from_records_logs_or_both(run_dir, collected, tmp_path):
    from_logs = results.collect(run_dir / "log").table
    both = collected.table
    assert len(both) == 4 and len(results.collect(run_dir / "log", run_dir / "result", False).table) == 4
    # the Scores lines give the log rows their scores too; the records add the intervals and non-members
    pd.testing.assert_frame_equal(both[from_logs.columns], from_logs)
    extra = set(both.columns) - set(from_logs.columns)
    assert extra == {
        f"{a}_{m}_{b}"
        for a in ("Conf", "Entr", "Mentr", "Hconf", "LiRA")
        for m in ("acc", "auc", "tpr1", "tpr01")
        for b in ("lo", "hi")
    } | {"nonmembers"}
    assert both["scores"].notna().all()
    # records alone (the logs gone) give the same table
    pd.testing.assert_frame_equal(results.collect(tmp_path / "no_logs", run_dir / "result").table, both)
    # a log block without a record (e.g. of an older version) is read from the log, next to the recorded ones
    shutil.copytree(run_dir / "log", tmp_path / "log")
    log = tmp_path / "log" / RUN / "iter_prunetxt_0.6_base.txt"
    with open(log, "a") as f:
        f.write(
            "Victim original model test accuracy: 91.000\nShadows: original\nSemantics: release\n"
            "Conf attack accuracy: 60.000\n"
        )
    mixed = results.collect(tmp_path / "log", run_dir / "result").table
    assert len(mixed) == 5 and mixed[mixed["setting"] == "original"]["Conf_acc"].tolist() == [60.0]


# ---------------------------------------------------------------- figures of the real run


def lines_of(ax):
    """{label: Line2D} of an axes' data lines (the chance diagonal and error bar caps aside)."""
    return {
        line.get_label(): line
        for line in ax.get_lines()
        if line.get_label() != "chance" and not line.get_label().startswith("_")
    }


def panels(fig):
    return {ax.get_title(): ax for ax in fig.axes if ax.get_visible() and ax.get_title()}


@pytest.mark.slow
def test_roc_lines_are_sklearns_curves(run_dir, collected):
    import matplotlib.pyplot as plt

    curves, problems = report_figures.roc_curves(collected.table, run_dir)
    assert problems == []
    fig = report_figures.draw_roc(curves)
    got = panels(fig)
    assert sorted(got) == sorted(f"{RUN}, sparsity {s}: {a}" for s in ("0.5", "0.6") for a in ("Mentr", "LiRA"))
    scores_of = {run_label(row): row["scores"] for row in collected.table.to_dict("records") if row["sparsity"] == 0.6}
    for attack in ("Mentr", "LiRA"):
        ax = got[f"{RUN}, sparsity 0.6: {attack}"]
        assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
        assert (ax.get_xlabel(), ax.get_ylabel()) == ("false positive rate", "true positive rate")
        assert set(lines_of(ax)) == LABELS  # one line per defense
        for label, line in lines_of(ax).items():
            with np.load(run_dir / scores_of[label]) as z:
                fpr, tpr, _ = roc_curve(z["member"], z[f"score_{attack}"])
                nonmembers = int((~z["member"]).sum())
            assert np.array_equal(line.get_xdata(), fpr) and np.array_equal(line.get_ydata(), tpr)
        assert ax.get_xlim() == pytest.approx((1 / nonmembers, 1))
        (chance,) = [line for line in ax.get_lines() if line.get_label() == "chance"]
        assert list(chance.get_xdata()) == list(chance.get_ydata())
    plt.close(fig)


def from_chance(ax):
    """An attack-accuracy axis starts at 50 %, or below it where a value or error bar lies below."""
    return ax.get_ylim()[0] == 50 if ax.dataLim.y0 >= 50 else ax.get_ylim()[0] < ax.dataLim.y0


@pytest.mark.slow
def test_every_figure_from_the_digits_run(run_dir, collected):
    import matplotlib.pyplot as plt

    agg = report_tables.aggregate(collected.table)

    fig = report_figures.draw_sparsity(agg)
    assert sorted(panels(fig)) == [f"{RUN}: {a} {m}" for a in ("LiRA", "Mentr") for m in ("AUC", "accuracy")]
    ax = panels(fig)[f"{RUN}: Mentr accuracy"]
    assert ax.get_xlabel() == "sparsity" and ax.get_ylabel() == "attack accuracy (%)"
    assert panels(fig)[f"{RUN}: Mentr AUC"].get_ylabel() == "attack AUC"
    assert list(ax.get_xticks()) == [0.5, 0.6]
    assert set(lines_of(ax)) == LABELS and list(lines_of(ax)["Base"].get_xdata()) == [0.5, 0.6]
    base = agg[(agg["defense"] == "base")].sort_values("sparsity")
    assert list(lines_of(ax)["Base"].get_ydata()) == list(base["Mentr_acc"])
    plt.close(fig)

    fig = report_figures.draw_bars(agg)
    ax = panels(fig)[f"{RUN}, sparsity 0.6"]
    labels = ["unpruned", "Base", "slide_re [s1w15]", "slide_re [s2w10]"]
    assert [t.get_text() for t in ax.get_xticklabels()] == labels
    row = agg[agg["sparsity"] == 0.6]
    assert [bar.get_height() for bar in ax.patches] == [row["pretrained_acc"].iloc[-1]] + list(row["pruned_acc"])
    twin = next(
        a
        for a in fig.axes
        if a is not ax
        and a.get_position().bounds == ax.get_position().bounds
        and a.get_ylabel() == "attack accuracy (%)"
    )
    assert list(lines_of(twin)) == ["Conf attack"]  # no SAMIA in this run
    assert list(twin.get_lines()[0].get_ydata())[1:] == list(row["Conf_acc"])  # the unpruned model: not attacked
    assert from_chance(twin)
    plt.close(fig)

    fig = report_figures.draw_iterations(collected.records)
    ax = panels(fig)[f"{RUN}, sparsity 0.6"]
    assert ax.get_xlabel() == "pruning iteration" and set(lines_of(ax)) == LABELS
    base = next(
        r
        for r in collected.records
        if r["kind"] == "prune" and r["run"]["sparsity"] == 0.6 and r["run"]["defense"] == "base"
    )
    assert list(lines_of(ax)["Base"].get_ydata()) == [it["accuracy"] for it in base["results"]["iterations"]["victim"]]
    assert list(lines_of(ax)["Base"].get_xdata()) == [0, 1]
    plt.close(fig)

    fig = report_figures.draw_sensitivity(agg)
    (ax,) = [a for a in fig.axes if a.get_title()]
    assert ax.get_title() == f"{RUN}, sparsity 0.6: slide_re" and ax.get_xlabel() == "stride-width"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1-15\n[s1w15]", "2-10\n[s2w10]"]
    (unpruned,) = [line for line in ax.get_lines() if line.get_label() == "unpruned test accuracy"]
    assert list(unpruned.get_ydata()) == [agg["pretrained_acc"].iloc[-1]] * 2
    twin = next(a for a in fig.axes if a is not ax)
    assert from_chance(twin) and twin.get_ylabel() == "attack accuracy (%)"
    plt.close(fig)

    fig = report_figures.draw_tradeoff(agg)
    ax = panels(fig)[RUN]
    assert {c.get_label() for c in ax.collections} == {"Base", "slide_re"}
    plt.close(fig)


@pytest.mark.slow
def test_report_command(run_dir):
    out = run_dir / "report"
    proc = run_forked("summarize.py", "--report", out, cwd=run_dir)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"wrote \S+report.md \(\d+\.\ds\)", proc.stderr)
    text = (out / "report.md").read_text()
    for name in ("roc", "sparsity", "bars", "iterations", "sensitivity", "tradeoff", "mechanism"):
        assert f"![{name}]({name}.png)" in text
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (out / f"{name}.pdf").read_bytes()[:5] == b"%PDF-"
    assert "no " not in proc.stderr.replace("no SAMIA", "")
    assert len(pd.read_csv(out / "results.csv")) == 4
    assert text.index("| dataset |") < text.index("![roc]")


# ---------------------------------------------------------------- synthetic records


def write_record(folder, kind, seed, sparsity, run_id, results, **run):
    """A Base run record of one seed and sparsity, its log block at the place records.py would name."""
    name = RUN if seed == 7 else f"{RUN}_seed{seed}"
    log = {"path": f"log/{name}/iter_prunetxt_{sparsity}_base.txt", "offset": 0 if kind == "prune" else 100, "end": 200}
    return Path(
        write_run_record(
            folder,
            kind,
            run_id,
            results,
            log=log,
            **{"run_name": name, "sparsity": sparsity, "seed": seed, "prefix": f"iter_prunetxt_{sparsity}", **run},
        )
    )


def synthetic_runs(folder):
    """Seeds 7 and 8 at sparsity 0.6 and 0.7: a prune record and an attack record each (no logs)."""
    known = {
        (7, 0.6): (80.0, 60.0, 0.61),
        (8, 0.6): (82.0, 64.0, 0.65),
        (7, 0.7): (78.0, 58.0, 0.58),
        (8, 0.7): (78.0, 58.0, 0.58),
    }
    for i, ((seed, sparsity), (acc, conf, auc)) in enumerate(known.items()):
        iterations = {"victim": [{"accuracy": acc + 1, "loss": 0.5}, {"accuracy": acc + seed - 7, "loss": "nan"}]}
        write_record(
            folder,
            "prune",
            seed,
            sparsity,
            f"{10 + 2 * i}",
            {
                "pretrained": {"accuracy": 90.0, "loss": 0.3},
                "iterations": iterations,
                "defend_time_s": 1.0 + seed,
                "dp_epsilon": None,
            },
        )
        write_record(
            folder,
            "attack",
            seed,
            sparsity,
            f"{11 + 2 * i}",
            {
                "victim": "pruned",
                "victim_test_acc": acc,
                "shadows": "x (base)",
                "attacks": [{"name": "Conf", "accuracy": conf, "AUC": auc, "TPR@1%FPR": 1.0, "TPR@0.1%FPR": "nan"}],
            },
            setting="base",
        )


def test_seeds_aggregate_into_mean_and_std(tmp_path):
    import matplotlib.pyplot as plt

    synthetic_runs(tmp_path)
    collected = results.collect(tmp_path / "log", tmp_path / "result")
    assert collected.problems == [] and len(collected.table) == 4
    agg = report_tables.aggregate(collected.table)
    assert list(agg["sparsity"]) == [0.6, 0.7] and list(agg["seeds"]) == ["7,8", "7,8"]
    first = agg.iloc[0]
    assert first["pruned_acc"] == 81.0 and first["pruned_acc_std"] == pytest.approx(math.sqrt(2))
    assert first["Conf_acc"] == 62.0 and first["Conf_acc_std"] == pytest.approx(math.sqrt(8))
    assert first["Conf_auc"] == pytest.approx(0.63) and first["defend_time_s_std"] == pytest.approx(math.sqrt(0.5))
    assert "Conf_tpr01" not in agg and agg.iloc[1]["pruned_acc_std"] == 0.0  # all nan: no column
    table = report_tables.report_table(agg)
    assert "| 81.000 ± 1.414 (80.000–82.000) |" in table and "| 0.6300 ± 0.0283 (0.6100–0.6500) |" in table
    assert "| 7,8 |" in table

    fig = report_figures.draw_sparsity(agg)
    ax = panels(fig)[f"{RUN}: Conf accuracy"]
    (line,) = lines_of(ax).values()
    assert list(line.get_ydata()) == [62.0, 58.0] and line.get_label() == "Base"
    (bars,) = ax.collections  # the error bars: the std over the two seeds
    ends = np.array([seg[:, 1] for seg in bars.get_segments()])
    assert np.allclose(ends, [[62 - 8**0.5, 62 + 8**0.5], [58.0, 58.0]])
    plt.close(fig)
    fig = report_figures.draw_iterations(collected.records)
    (line,) = lines_of(panels(fig)[f"{RUN}, sparsity 0.6"]).values()
    assert list(line.get_ydata()) == [82.0, 81.5]  # iteration means over seeds 7 and 8
    plt.close(fig)


@pytest.mark.slow
def test_damaged_records_are_named_and_skipped(tmp_path):
    synthetic_runs(tmp_path)
    folder = tmp_path / "result" / RUN / "records"
    damaged = {
        "empty.json": "",
        "broken.json": '{"kind": "prune", ',
        "list.json": "[1, 2]",
        "partial.json": json.dumps({"kind": "attack", "run_id": "x", "start": "s", "run": {}, "results": {}}),
    }
    for name, text in damaged.items():
        (folder / name).write_text(text)
    collected = results.collect(tmp_path / "log", tmp_path / "result")
    assert len(collected.table) == 4
    assert sorted(os.path.basename(p.split(":")[0]) for p in collected.problems) == sorted(damaged)
    assert any("empty file" in p for p in collected.problems)
    assert any("not valid JSON" in p for p in collected.problems)
    assert any("a JSON list, not an object" in p for p in collected.problems)

    proc = run_forked("summarize.py", "log", "--report", "out", "--allow_empty", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for name in damaged:
        assert f"skipped {folder / name}" in proc.stderr or f"skipped result/{RUN}/records/{name}" in proc.stderr
    text = (tmp_path / "out" / "report.md").read_text()
    assert text.count("- skipped ") == 4 and "| 81.000 ± 1.414 (80.000–82.000) |" in text
    # figures without data say why, once, in the report and on stderr
    for why in (
        "no roc figure: no run in the table has a scores file",
        "no sensitivity figure: the runs hold one window setting per defense",
    ):
        assert f"_{why}" in text and why in proc.stderr
    assert "![sparsity](sparsity.png)" in text and "![iterations](iterations.png)" in text
    assert "Traceback" not in proc.stderr


def test_run_ids_are_unique_and_records_strict_json():
    start = records.utc_now()
    assert records.make_run_id(start) == records.make_run_id(start)  # stable for one run
    assert re.fullmatch(r"\d{8}T\d{12}Z_[\w-]+_\d+", records.make_run_id(start))
    assert records.number(float("nan")) == "nan" and records.number(float("inf")) == "inf"
    assert records.logged(96.50349) == 96.503 and results.value("inf") == math.inf

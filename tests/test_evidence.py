"""The report's evidence on synthetic runs with known per-sample data: intervals in the table, TPRs that
cannot be measured, the paired comparison with Base, the mem-score bins, and the figures' axes (chance,
zoom, the unpruned reference, error bars from the intervals)."""

import numpy as np
import pandas as pd
import pytest

import paths
from attacks import _rankable
from conftest import write_run_record
from intervals import Attacked
from reporting import figures as report_figures
from reporting import report, results
from reporting import tables as report_tables
from test_intervals import literal_draws, literal_interval, literal_metrics

RUN = "digits_columnfc"
N_MEMBERS, N_NONMEMBERS = 150, 120


def write_run(folder, kind, run_id, results_, scores=None, **run):
    write_run_record(folder, kind, run_id, results_, None, scores, **run)


def sample_data(shift, seed):
    """Conf scores with threshold decisions and LiRA scores of the victim's members then non-members; the
    members are training rows 0..N_MEMBERS-1 (listed in a shuffled order), the non-members test rows."""
    rng = np.random.default_rng(seed)
    member = np.arange(N_MEMBERS + N_NONMEMBERS) < N_MEMBERS
    conf = np.round(rng.normal(size=len(member)) + shift * member, 1)
    lira = rng.normal(size=len(member)) + shift * member * np.linspace(0, 2, len(member))
    order = np.r_[np.random.default_rng(99).permutation(N_MEMBERS), N_MEMBERS + np.arange(N_NONMEMBERS)]
    return {
        "member": member[order],
        "conf": conf[order],
        "said": conf[order] > 0.3,
        "lira": lira[order],
        "index": np.r_[np.arange(N_MEMBERS), 1000 + np.arange(N_NONMEMBERS)][order],
    }


def write_scores(folder, name, data):
    path = f"result/{RUN}/scores/{name}.npz"
    (folder / path).parent.mkdir(parents=True, exist_ok=True)
    index = data["index"]
    np.savez(
        folder / path,
        index=index,
        set=np.where(index < 1000, "train", "test"),
        set_index=np.where(index < 1000, index, index - 1000),
        label=np.zeros(len(index), int),
        member=data["member"],
        attacks=np.array(["Conf", "LiRA"]),
        score_Conf=data["conf"],
        score_LiRA=data["lira"],
        accuracy_kind=np.array(["balanced", "best_balanced"]),
        decision_Conf=data["said"],
    )
    return path


def attack_results(data, victim_acc):
    m, said = data["member"], data["said"]
    conf_acc = 100 * 0.5 * (said[m].mean() + (~said[~m]).mean())
    conf_interval = (round(conf_acc, 3) - 3, round(conf_acc, 3) + 4)
    return {
        "victim_test_acc": victim_acc,
        "shadows": "x",
        "members": N_MEMBERS,
        "nonmembers": N_NONMEMBERS,
        "attacks": [
            {
                "name": "Conf",
                "accuracy": round(conf_acc, 3),
                "AUC": 0.6,
                "TPR@1%FPR": 2.0,
                "TPR@0.1%FPR": 1.0,
                "intervals": {"accuracy": list(conf_interval), "AUC": [0.55, 0.65]},
            },
            {"name": "LiRA", "accuracy": 60.0, "AUC": 0.6, "TPR@1%FPR": 2.0, "TPR@0.1%FPR": 1.0},
        ],
    }


RUNS = {  # name: (shift, seed, setting, defense)
    "unpruned": (0.2, 1, "original", "base"),
    "base": (1.0, 2, "base", "base"),
    "ml2": (0.4, 3, "adaptive", "ml2"),
}


@pytest.fixture
def synthetic(tmp_path, monkeypatch):
    monkeypatch.setattr(paths, "MEMSCORE_ROOT", str(tmp_path / "memscore"))
    (tmp_path / "memscore").mkdir()
    rng = np.random.default_rng(5)  # like digits' mem-scores: many zeros, so ties span several deciles
    memscores = np.where(rng.random(N_MEMBERS + 10) < 0.45, 0.0, np.round(rng.random(N_MEMBERS + 10), 1))
    pd.DataFrame({"0": memscores}).to_csv(tmp_path / "memscore" / "memscore_digits_columnfc.csv")
    data = {}
    for i, (name, (shift, seed, setting, defense)) in enumerate(RUNS.items()):
        data[name] = sample_data(shift, seed)
        scores = write_scores(tmp_path, name, data[name])
        if setting != "original":
            write_run(
                tmp_path,
                "prune",
                f"{10 + 2 * i}",
                {
                    "pretrained": {"accuracy": 90.0, "loss": 0.3},
                    "iterations": {},
                    "defend_time_s": 1.0,
                    "dp_epsilon": None,
                },
                defense=defense,
                prefix=f"iter_prunetxt_0.6_{defense}",
            )
        victim_acc = 90.0 if setting == "original" else 80.0  # the unpruned model's accuracy is the prune runs' 90
        write_run(
            tmp_path,
            "attack",
            f"{11 + 2 * i}",
            attack_results(data[name], victim_acc),
            scores,
            setting=setting,
            defense=defense,
            prefix=f"iter_prunetxt_0.6_{defense}",
        )
    collected = results.collect(tmp_path / "log", tmp_path / "result")
    assert collected.problems == [] and len(collected.table) == 3
    return tmp_path, collected, data, memscores


def attacked(d, attack):
    if attack == "Conf":
        return Attacked(_rankable(d["conf"]), d["member"], "balanced", d["said"])
    return Attacked(_rankable(d["lira"]), d["member"], "best_balanced")


def test_intervals_reach_the_table_and_the_csv(synthetic):
    _, collected, data, _ = synthetic
    table = collected.table
    base = table[table["defense"] == "base"].iloc[-1]
    assert (base["Conf_acc_lo"], base["Conf_acc_hi"], base["Conf_auc_lo"]) == (
        base["Conf_acc"] - 3,
        base["Conf_acc"] + 4,
        0.55,
    )
    assert base["nonmembers"] == N_NONMEMBERS
    assert list(table.columns[-3:]) == ["LiRA_tpr01", "nonmembers", "scores"]
    md = report_tables.report_table(report_tables.aggregate(table))
    acc = round(
        100
        * 0.5
        * (
            data["base"]["said"][data["base"]["member"]].mean()
            + (~data["base"]["said"][~data["base"]["member"]]).mean()
        ),
        3,
    )
    assert f"| {acc:.3f} [{acc - 3:.3f}, {acc + 4:.3f}] |" in md
    # 120 non-members: TPR at 1 % and 0.1 % FPR rest on 1 and 0 false positives
    assert "2.000" not in md and md.count("| n/m ") == 4 * 3


def test_not_measurable_tpr_and_seed_spread():
    row = {
        k: v
        for k, v in zip(results.KEY, ["d", "m", "p", 0.6, "base", np.nan, np.nan, np.nan, "base", "release", "", 7])
    }
    df = pd.DataFrame(
        [
            {**row, "Conf_tpr1": 2.5, "Conf_tpr01": 0.1, "nonmembers": 1300.0},
            {**row, "seed": 8, "Conf_tpr1": 3.5, "Conf_tpr01": 0.2, "nonmembers": 1300.0},
        ]
    )
    md = report_tables.report_table(report_tables.aggregate(df))
    # 1 % of 1300 = 13 false positives: measured; 0.1 % = 1.3: not
    assert "| 3.000 ± 0.707 (2.500–3.500) | n/m | 1300 |" in md


def test_paired_differences_equal_a_literal_loop(synthetic):
    root, collected, data, _ = synthetic
    paired, problems = report_tables.paired_table(collected.table, root, resamples=80)
    assert problems == [] and len(paired) == 1 and paired.iloc[0]["defense"] == "ml2"
    row = paired.iloc[0]
    for attack in ("Conf", "LiRA"):
        ours, base = attacked(data["ml2"], attack), attacked(data["base"], attack)
        # Base's samples in the defense's order (here both share one order)
        draws_ours, draws_base = literal_draws([ours, base], 80, 7)
        for metric, short in results.METRICS.items():
            point = (
                literal_metrics(ours.scores, ours.member, ours.accuracy_kind, ours.decisions)[metric]
                - literal_metrics(base.scores, base.member, base.accuracy_kind, base.decisions)[metric]
            )
            want = literal_interval(np.array(draws_ours[metric]) - np.array(draws_base[metric]))
            col = f"{attack}_{short}_diff"
            assert row[col] == pytest.approx(point, abs=1e-12)
            assert (row[f"{col}_lo"], row[f"{col}_hi"]) == pytest.approx(want, rel=1e-9, abs=1e-12)
    md = report_tables.paired_markdown(paired)
    low, high = row["LiRA_auc_diff_lo"], row["LiRA_auc_diff_hi"]
    header, _, line = md.splitlines()
    cells = dict(zip([c.strip() for c in header.split("|")], [c.strip() for c in line.split("|")]))
    assert cells["Δ LiRA_auc"] == f"{row['LiRA_auc_diff']:+.4f} [{low:+.4f}, {high:+.4f}]" + (
        " changed" if low > 0 or high < 0 else ""
    )
    assert cells["Δ LiRA_tpr1"] == "n/m"  # 120 non-members


def test_mem_score_bins_equal_a_literal_loop_and_the_plot(synthetic):
    import matplotlib.pyplot as plt

    root, collected, data, memscores = synthetic
    (panel,) = report_tables.mechanism_table(collected.table, root)
    assert panel["attack"] == "LiRA" and panel["labels"] == ["unpruned", "Base", "ml2"]
    # literal: the decile edges of the members' mem-scores; a member goes to the first decile whose upper
    # edge is at or above its score (tied scores share a decile); deciles without members are left out
    edges = [np.quantile(memscores[:N_MEMBERS], k / 10) for k in range(1, 10)]
    deciles = {}
    for i in range(N_MEMBERS):
        k = next((j for j, edge in enumerate(edges) if memscores[i] <= edge), 9)
        deciles.setdefault(k + 1, []).append(i)
    assert [b["bin"] for b in panel["bins"]] == sorted(deciles) and len(deciles) < 10  # ties: fewer bins
    for b in panel["bins"]:
        part = deciles[b["bin"]]
        assert (b["count"], b["low"], b["high"]) == (len(part), memscores[part].min(), memscores[part].max())
        for label, name in (("unpruned", "unpruned"), ("Base", "base"), ("ml2", "ml2")):
            d = data[name]
            lira_of = {int(i): s for i, s, m in zip(d["index"], d["lira"], d["member"]) if m}
            assert b["means"][label] == pytest.approx(sum(lira_of[i] for i in part) / len(part), rel=1e-12)
    fig = report_figures.draw_mechanism([panel])
    ax = fig.axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert list(lines) == ["unpruned", "Base", "ml2"]
    assert list(lines["Base"].get_ydata()) == [b["means"]["Base"] for b in panel["bins"]]
    assert list(lines["Base"].get_xdata()) == [b["bin"] for b in panel["bins"]]
    assert ax.get_ylabel() == "mean LiRA member score" and ax.get_xlabel() == "mem-score decile (1 = lowest)"
    plt.close(fig)
    md = report_tables.mechanism_markdown([panel])
    first = panel["bins"][0]
    assert f"| 1 | {first['low']:.3f}–{first['high']:.3f} | {first['count']} | " in md


def test_no_mem_scores_no_mechanism(synthetic):
    root, collected, _, _ = synthetic
    (root / "memscore" / "memscore_digits_columnfc.csv").unlink()
    with pytest.raises(report_tables.NoData, match="has no mem-scores"):
        report_tables.mechanism_table(collected.table, root)


def twin_of(fig, ax):
    return next(a for a in fig.axes if a is not ax and a.get_position().bounds == ax.get_position().bounds)


def test_figure_axes_start_at_chance_show_the_unpruned_model_and_say_when_zoomed(synthetic):
    import matplotlib.pyplot as plt

    _, collected, _, _ = synthetic
    agg = report_tables.aggregate(collected.table)
    base = agg[(agg["defense"] == "base") & (agg["setting"] == "base")].iloc[0]
    for zoom in (False, True):
        fig = report_figures.draw_bars(agg, zoom)
        ax = fig.axes[0]
        twin = twin_of(fig, ax)
        assert [t.get_text() for t in ax.get_xticklabels()] == ["unpruned", "Base", "ml2"]
        assert [bar.get_height() for bar in ax.patches] == [90.0, 80.0, 80.0]
        assert ax.get_ylabel() == "victim test accuracy (%), axis zoomed" and ax.get_ylim()[0] == 65.0
        conf = twin.get_lines()[0]
        unpruned_conf = agg[agg["setting"] == "original"]["Conf_acc"].iloc[0]
        assert list(conf.get_ydata()) == [unpruned_conf, base["Conf_acc"], agg.iloc[-1]["Conf_acc"]]
        if zoom:
            assert twin.get_ylim()[0] > 50 and twin.get_ylabel() == "attack accuracy (%), axis zoomed"
        else:
            assert twin.get_ylim()[0] == 50 and twin.get_ylabel() == "attack accuracy (%)"
        # error bars of one seed: the run's bootstrap interval, [accuracy - 3, accuracy + 4] here
        (bars,) = twin.collections
        ends = np.array([seg[:, 1] for seg in bars.get_segments()])
        assert np.allclose(ends, [[y - 3, y + 4] for y in conf.get_ydata()])
        plt.close(fig)

        fig = report_figures.draw_tradeoff(agg, zoom)
        ax = fig.axes[0]
        assert ax.get_xlabel() == "pruned victim test accuracy (%), axis zoomed"
        assert (ax.get_ylim()[0] == 50) != zoom
        assert ax.get_ylabel() == "strongest attack accuracy (%)" + (", axis zoomed" if zoom else "")
        assert any(line.get_label().startswith("unpruned") for line in ax.get_lines())
        plt.close(fig)


def test_report_holds_the_paired_table_and_the_bins(synthetic):
    root, collected, _, _ = synthetic
    out = root / "report"
    out.mkdir()
    left_out = report.write_report(str(out), collected, str(root), resamples=50)
    text = (out / "report.md").read_text()
    assert "## Defenses against Base (paired)" in text and "| ml2 | 0.6 | 7 |" in text
    assert "mean LiRA member score of the victim's members per mem-score decile" in text
    assert "![mechanism](mechanism.png)" in text and (out / "mechanism.png").exists()
    assert not any("paired" in line or "mechanism" in line for line in left_out)
    csv = pd.read_csv(out / "results.csv")
    assert csv[csv["defense"] == "ml2"]["Conf_auc_diff_lo"].notna().all()
    assert csv[csv["defense"] == "base"]["Conf_auc_diff"].isna().all()


def test_the_auc_figure_shows_the_strongest_attacks_aucs_with_intervals_and_the_control_beside_base(synthetic):
    """draw_auc_bars: bars of test accuracy, one AUC line per attack present (LiRA before Conf: strongest first),
    its error bars the run's interval, and the fine-tuning control (Base at sparsity 0) between the unpruned
    model and Base in the sparsity-0.6 panel (no panel of its own)."""
    import matplotlib.pyplot as plt

    _, collected, _, _ = synthetic
    agg = report_tables.aggregate(collected.table)
    base = agg[(agg["defense"] == "base") & (agg["setting"] == "base")].iloc[0]
    control = base.copy()
    control["sparsity"], control["pruned_acc"], control["LiRA_auc"] = 0.0, 85.0, 0.7
    control["Conf_auc"], control["Conf_auc_lo"], control["Conf_auc_hi"] = 0.62, 0.58, 0.67
    agg = pd.concat([agg, control.to_frame().T.astype(agg.dtypes.to_dict())], ignore_index=True)
    fig = report_figures.draw_auc_bars(agg)
    ax = fig.axes[0]
    assert ax.get_title() == f"{RUN}, sparsity 0.6" and len([a for a in fig.axes if a.get_title()]) == 1
    assert [t.get_text() for t in ax.get_xticklabels()] == ["unpruned", "fine-tuned, not pruned", "Base", "ml2"]
    assert [bar.get_height() for bar in ax.patches] == [90.0, 85.0, 80.0, 80.0]
    twin = twin_of(fig, ax)
    lines = {line.get_label(): line for line in twin.get_lines() if not line.get_label().startswith("_")}
    assert list(lines) == ["LiRA AUC", "Conf AUC"]
    assert twin.get_ylim()[0] == 0.5 and twin.get_ylabel() == "attack AUC (0.5 = chance)"
    order = [agg[agg["setting"] == "original"].iloc[0], control, base, agg[agg["defense"] == "ml2"].iloc[0]]
    for attack in ("LiRA", "Conf"):
        assert list(lines[f"{attack} AUC"].get_ydata()) == [row[f"{attack}_auc"] for row in order]
    (conf_bars,) = twin.collections  # LiRA has no interval in these runs
    ends = np.array([seg[:, 1] for seg in conf_bars.get_segments()])
    assert np.allclose(ends, [[row["Conf_auc_lo"], row["Conf_auc_hi"]] for row in order])
    plt.close(fig)

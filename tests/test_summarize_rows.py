"""summarize.py's one row per configuration, from every run: attacks of one model merge into its row, a newer
run of an attack replaces the older whole, attacks on a replaced model stay apart, and the table is the same
from the logs with their records, from the logs alone and from the records alone."""

import os
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import write_run_record  # noqa: E402
from helpers import is_nan, one_row  # noqa: E402
from reporting import results  # noqa: E402

PRUNE_HEADER = "digits_columnfc_iter_prunetxt_0.6{}_0.0005"
SCORES = "result/digits_columnfc/scores/iter_prunetxt_0.6{}_{}_release_2025010{}T000000000000Z_h_1.npz"
THRESHOLD = {
    "Conf": (55.125, 0.5612, 1.234, 0.1),
    "Entr": (54.25, 0.5501, 0.9, 0.0),
    "Mentr": (56.5, 0.5733, 1.5, 0.2),
    "Hconf": (53.75, 0.5402, 0.8, 0.0),
}
TOP3 = {"Top3-NN": (61.5, 0.6012, 2.5, 0.3)}
THRESHOLD_AGAIN = {
    "Conf": (57.0, 0.6, 2.0, 0.25),
    "Entr": (55.0, 0.57, 1.0, 0.1),
    "Mentr": (58.0, 0.61, 2.2, 0.3),
    "Hconf": (54.0, 0.55, 0.7, 0.1),
}


def prune_block(defense="base", arg="", pretrained=81.234, time=10.0):
    """A prune run's lines as prune_modi.py writes them."""
    label = "Base" if defense == "base" else defense
    name = "" if defense == "base" else f"_{defense}{arg and '_' + arg}"
    return (
        f"{PRUNE_HEADER.format(name)}\nSemantics: release\n"
        f"Pretrained Victim: Accuracy {pretrained:.3f}, Loss 0.500\n"
        f"victim iter 0 best model: Accuracy 80.000, Loss 0.600\nTotal {label} defend time: {time:.3f}s\n"
        "shadow 0 iter 0 best model: Accuracy 79.000, Loss 0.650\n"
    )


def attack_block(victim, shadows, found, scores=None, kind="pruned"):
    """An attack run's lines as mia_modi.py writes them; found: {attack: (accuracy, AUC, TPR@1%FPR, TPR@0.1%FPR)}."""
    lines = [f"Victim {kind} model test accuracy: {victim:.3f}", f"Shadows: {shadows}", "Semantics: release"]
    for name, (acc, auc, tpr1, tpr01) in found.items():
        lines += [
            f"{name} attack accuracy: {acc:.3f}",
            f"{name} attack AUC: {auc:.4f}",
            f"{name} attack TPR@1%FPR: {tpr1:.3f}",
            f"{name} attack TPR@0.1%FPR: {tpr01:.3f}",
        ]
    return "\n".join(lines + ([f"Scores: {scores}"] if scores else [])) + "\n"


def cells(df, columns):
    """The table's rows as lists of the given columns' values, None for an empty cell."""
    return [[None if is_nan(v) else v for v in row] for row in df[columns].itertuples(index=False)]


def metrics(r, name):
    return tuple(r[f"{name}_{m}"] for m in ("acc", "auc", "tpr1", "tpr01"))


def write_log(tmp_path, name, blocks, mtime=1_000_000):
    """log/digits_columnfc/<name> holding the blocks; returns the byte offset of each block."""
    path = tmp_path / "log" / "digits_columnfc" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(blocks))
    os.utime(path, (mtime, mtime))
    return [sum(len(b.encode()) for b in blocks[:i]) for i in range(len(blocks))]


def write_record(tmp_path, kind, run_id, log_name, offset, results, scores=None, **run):
    """A run record as records.py writes it, naming its block in log/digits_columnfc/<log_name>."""
    log = {"path": f"log/digits_columnfc/{log_name}", "offset": offset, "end": offset + 1}
    write_run_record(tmp_path, kind, run_id, results, log, scores, **run)


def prune_record(tmp_path, run_id, log_name, pretrained=81.234, time=10.0, offset=0, **run):
    write_record(
        tmp_path,
        "prune",
        run_id,
        log_name,
        offset,
        {
            "pretrained": {"accuracy": pretrained, "loss": 0.5},
            "defend_time_s": time,
            "dp_epsilon": None,
            "iterations": {"victim": [{"accuracy": 80.0, "loss": 0.6}]},
        },
        **run,
    )


def attack_record(tmp_path, run_id, log_name, offset, victim, found, setting, scores=None, kind="pruned", **run):
    attacks = [
        {"name": name, "accuracy": acc, "AUC": auc, "TPR@1%FPR": tpr1, "TPR@0.1%FPR": tpr01}
        for name, (acc, auc, tpr1, tpr01) in found.items()
    ]
    write_record(
        tmp_path,
        "attack",
        run_id,
        log_name,
        offset,
        {"victim": kind, "victim_test_acc": victim, "shadows": "x", "attacks": attacks},
        scores,
        setting=setting,
        **run,
    )


def same_table_three_ways(tmp_path, newest_only=True):
    """The table from the logs with their records, from the logs alone and from the records alone: the same."""
    both = results.collect(tmp_path / "log", tmp_path / "result", newest_only)
    assert both.problems == []
    pd.testing.assert_frame_equal(results.collect(tmp_path / "log", None, newest_only).table, both.table)
    pd.testing.assert_frame_equal(
        results.collect(tmp_path / "no_logs", tmp_path / "result", newest_only).table, both.table
    )
    return both.table


def test_runs_with_other_attacks_merge_into_one_row(tmp_path):
    """mia_modi.py --attacks threshold, then --attacks nn_top3 on the same pruned model: one row with the
    threshold columns of the first run and the Top3-NN columns of the second, the victim's accuracy and
    scores file of the newest; the same from the records."""
    log = "iter_prunetxt_0.6_base.txt"
    first, second = SCORES.format("", "base", 1), SCORES.format("", "base", 2)
    blocks = [
        prune_block(),
        attack_block(80.0, "iter_prunetxt_0.6 (base)", THRESHOLD, first),
        attack_block(80.5, "iter_prunetxt_0.6 (base)", TOP3, second),
    ]
    at = write_log(tmp_path, log, blocks)
    prune_record(tmp_path, "10", log)
    attack_record(tmp_path, "11", log, at[1], 80.0, THRESHOLD, "base", first)
    attack_record(tmp_path, "12", log, at[2], 80.5, TOP3, "base", second)

    df = same_table_three_ways(tmp_path)
    assert len(df) == 1
    merged = df.iloc[0]
    assert (merged["defense"], merged["setting"], merged["pretrained_acc"], merged["defend_time_s"]) == (
        "base",
        "base",
        81.234,
        10.0,
    )
    assert merged["pruned_acc"] == 80.5 and merged["scores"] == second
    for name, values in {**THRESHOLD, **TOP3}.items():
        assert metrics(merged, name) == values
    assert list(df.columns) == results.COLUMNS + [
        f"{a}_{m}" for a in ("Conf", "Entr", "Mentr", "Hconf", "Top3-NN") for m in ("acc", "auc", "tpr1", "tpr01")
    ] + ["scores"]

    every = same_table_three_ways(tmp_path, newest_only=False)  # --all: every run its own row, as before
    assert list(every["pruned_acc"]) == [80.0, 80.5] and list(every["scores"]) == [first, second]
    assert list(every["Conf_acc"].fillna(-1)) == [55.125, -1] and list(every["Top3-NN_acc"].fillna(-1)) == [-1, 61.5]


def test_a_newer_run_of_an_attack_wins_whole(tmp_path):
    """threshold, nn_top3, threshold again: the second threshold run's values; then a run that logs Conf's
    accuracy alone (an older version's): Conf is that run's, without the earlier run's AUC and TPR."""
    base = "iter_prunetxt_0.6 (base)"
    blocks = [
        prune_block(),
        attack_block(80.0, base, THRESHOLD),
        attack_block(80.5, base, TOP3),
        attack_block(81.0, base, THRESHOLD_AGAIN),
    ]
    write_log(tmp_path, "iter_prunetxt_0.6_base.txt", blocks)
    merged = results.parse_logs(tmp_path / "log").iloc[0]
    assert merged["pruned_acc"] == 81.0 and metrics(merged, "Top3-NN") == TOP3["Top3-NN"]
    for name, values in THRESHOLD_AGAIN.items():
        assert metrics(merged, name) == values

    blocks.append(
        "Victim pruned model test accuracy: 81.500\nShadows: iter_prunetxt_0.6 (base)\nConf attack accuracy: 59.000\n"
    )
    write_log(tmp_path, "iter_prunetxt_0.6_base.txt", blocks)
    df = results.parse_logs(tmp_path / "log")
    merged = df.iloc[0]
    assert merged["Conf_acc"] == 59.0 and "Conf_auc" not in df and "Conf_tpr1" not in df
    assert metrics(merged, "Mentr") == THRESHOLD_AGAIN["Mentr"] and merged["pruned_acc"] == 81.5


def test_attacks_on_a_replaced_model_do_not_merge_with_the_new_one(tmp_path):
    """threshold on a pruned model, the configuration pruned again, nn_top3 on the new model: the row holds the
    new model's attacks only (the old threshold numbers belong to a model that no longer exists); the same
    from the records. --all keeps both."""
    log = "iter_prunetxt_0.6_base.txt"
    base = "iter_prunetxt_0.6 (base)"
    blocks = [prune_block(), attack_block(80.0, base, THRESHOLD), prune_block(), attack_block(80.5, base, TOP3)]
    at = write_log(tmp_path, log, blocks)
    prune_record(tmp_path, "10", log)
    attack_record(tmp_path, "11", log, at[1], 80.0, THRESHOLD, "base")
    write_record(
        tmp_path,
        "prune",
        "12",
        log,
        at[2],
        {"pretrained": {"accuracy": 81.234, "loss": 0.5}, "defend_time_s": 10.0, "dp_epsilon": None, "iterations": {}},
    )
    attack_record(tmp_path, "13", log, at[3], 80.5, TOP3, "base")
    df = same_table_three_ways(tmp_path)
    assert len(df) == 1 and df.iloc[0]["pruned_acc"] == 80.5
    assert metrics(df.iloc[0], "Top3-NN") == TOP3["Top3-NN"] and "Conf_acc" not in df
    every = same_table_three_ways(tmp_path, newest_only=False)
    assert list(every["pruned_acc"]) == [80.0, 80.5]


def test_an_attack_on_a_replaced_model_is_stale_in_the_new_prune_runs_row(tmp_path):
    """Pruned, attacked, pruned again (same configuration): the setting's row holds the new prune run's numbers
    with empty attack columns and the status stale, not the first run's numbers marked ok beside a row without
    a setting. ppb: adaptive and base attacked, pruned again, base attacked again: the adaptive row is stale,
    the base row the new model's as before. The same from the records; --all keeps every run as it was."""
    base_log, ppb_log = "iter_prunetxt_0.6_base.txt", "iter_prunetxt_0.6_ppb.txt"
    base_scores = SCORES.format("", "base", 1)
    base_at = write_log(
        tmp_path,
        base_log,
        [prune_block(), attack_block(80.0, "iter_prunetxt_0.6 (base)", THRESHOLD, base_scores), prune_block(time=12.5)],
    )
    ppb_blocks = [
        prune_block("ppb", "4.0", time=20.0),
        attack_block(79.0, "iter_prunetxt_0.6_ppb_4.0 (adaptive)", THRESHOLD),
        attack_block(79.5, "iter_prunetxt_0.6 (base)", TOP3),
        prune_block("ppb", "4.0", pretrained=82.0, time=21.0),
        attack_block(78.0, "iter_prunetxt_0.6 (base)", TOP3),
    ]
    ppb_at = write_log(tmp_path, ppb_log, ppb_blocks, mtime=1_000_001)
    prune_record(tmp_path, "10", base_log)
    attack_record(tmp_path, "11", base_log, base_at[1], 80.0, THRESHOLD, "base", base_scores)
    prune_record(tmp_path, "12", base_log, time=12.5, offset=base_at[2])
    ppb = {"defense": "ppb", "defend_arg": 4.0, "prefix": "iter_prunetxt_0.6_ppb_4.0"}
    prune_record(tmp_path, "20", ppb_log, time=20.0, **ppb)
    attack_record(tmp_path, "21", ppb_log, ppb_at[1], 79.0, THRESHOLD, "adaptive", **ppb)
    attack_record(tmp_path, "22", ppb_log, ppb_at[2], 79.5, TOP3, "base", **ppb)
    prune_record(tmp_path, "23", ppb_log, pretrained=82.0, time=21.0, offset=ppb_at[3], **ppb)
    attack_record(tmp_path, "24", ppb_log, ppb_at[4], 78.0, TOP3, "base", **ppb)

    df = same_table_three_ways(tmp_path)
    stale = "stale: pruned again after its attacks; rerun mia_modi.py for this setting (--all shows the earlier "
    stale += "attacks)"
    shown = ["defense", "defend_arg", "setting", "pretrained_acc", "pruned_acc", "defend_time_s", "status"]
    assert cells(df, shown) == [
        ["base", None, "base", 81.234, None, 12.5, stale],
        ["ppb", 4.0, "adaptive", 82.0, 78.0, 21.0, stale],  # the new model's test accuracy, from its base attack
        ["ppb", 4.0, "base", 82.0, 78.0, 21.0, "ok"],
    ]
    assert list(df.columns) == results.COLUMNS + [f"Top3-NN_{m}" for m in ("acc", "auc", "tpr1", "tpr01")]
    assert df["Top3-NN_acc"].fillna(-1).tolist() == [-1, -1, TOP3["Top3-NN"][0]]

    every = same_table_three_ways(tmp_path, newest_only=False)
    assert cells(every, shown) == [
        ["base", None, None, 81.234, None, 12.5, "ok"],
        ["base", None, "base", 81.234, 80.0, 10.0, "ok"],
        ["ppb", 4.0, "adaptive", 81.234, 79.0, 20.0, "ok"],
        ["ppb", 4.0, "base", 81.234, 79.5, 20.0, "ok"],
        ["ppb", 4.0, "base", 82.0, 78.0, 21.0, "ok"],
    ]
    assert every["Conf_acc"].fillna(-1).tolist() == [-1, 55.125, 55.125, -1, -1] and set(every["scores"].dropna()) == {
        base_scores
    }


def test_adaptive_attack_on_base_is_the_base_setting(tmp_path):
    """An older version's mia_modi.py --adaptive without --defend logged "(adaptive)": it used the Base-pruned
    shadows, so it is the base setting and merges with the base runs, from the logs and from the records."""
    log = "iter_prunetxt_0.6_base.txt"
    blocks = [
        prune_block(),
        attack_block(80.0, "iter_prunetxt_0.6 (adaptive)", THRESHOLD),
        attack_block(80.5, "iter_prunetxt_0.6 (base)", TOP3),
    ]
    at = write_log(tmp_path, log, blocks)
    prune_record(tmp_path, "10", log)
    attack_record(tmp_path, "11", log, at[1], 80.0, THRESHOLD, "adaptive")
    attack_record(tmp_path, "12", log, at[2], 80.5, TOP3, "base")

    df = same_table_three_ways(tmp_path)
    assert len(df) == 1 and df.loc[0, "setting"] == "base" and df.loc[0, "defense"] == "base"
    assert metrics(df.iloc[0], "Conf") == THRESHOLD["Conf"] and metrics(df.iloc[0], "Top3-NN") == TOP3["Top3-NN"]
    assert list(same_table_three_ways(tmp_path, newest_only=False)["setting"]) == ["base", "base"]


def test_original_attack_under_a_defense_is_the_unpruned_model(tmp_path):
    """An older version's mia_modi.py --original --defend ppb logged into ppb's log: it attacked the unpruned
    models, so it is the original setting of Base (no defend_arg, none of ppb's prune numbers) and merges
    with the --original run in Base's log; ppb's prune run stays a row of its own, without attacks."""
    base_log, ppb_log = "iter_prunetxt_0.6_base.txt", "iter_prunetxt_0.6_ppb.txt"
    base_at = write_log(
        tmp_path,
        base_log,
        [prune_block(), attack_block(81.5, "original", {"SAMIA": (70.25, 0.7011, 5.0, 1.0)}, kind="original")],
    )
    ppb_at = write_log(
        tmp_path,
        ppb_log,
        [prune_block("ppb", "4.0", time=12.5), attack_block(81.625, "original", THRESHOLD, kind="original")],
        mtime=1_000_001,
    )
    prune_record(tmp_path, "10", base_log)
    attack_record(
        tmp_path, "11", base_log, base_at[1], 81.5, {"SAMIA": (70.25, 0.7011, 5.0, 1.0)}, "original", kind="original"
    )
    ppb = {"defense": "ppb", "defend_arg": 4.0, "prefix": "iter_prunetxt_0.6_ppb_4.0"}
    prune_record(tmp_path, "12", ppb_log, time=12.5, **ppb)
    attack_record(tmp_path, "13", ppb_log, ppb_at[1], 81.625, THRESHOLD, "original", kind="original", **ppb)

    df = same_table_three_ways(tmp_path)
    assert list(zip(df["defense"], df["setting"].fillna("-"))) == [("base", "original"), ("ppb", "-")]
    original = one_row(df, setting="original")
    assert is_nan(original["defend_arg"]) and is_nan(original["window"]) and is_nan(original["pruned_acc"])
    assert original["pretrained_acc"] == 81.625  # the newest unpruned victim's test accuracy
    assert original["defend_time_s"] == 10.0 and is_nan(original["dp_epsilon"])  # Base's, as for any Base row
    assert metrics(original, "SAMIA") == (70.25, 0.7011, 5.0, 1.0) and metrics(original, "Conf") == THRESHOLD["Conf"]
    pruned = one_row(df, defense="ppb")
    assert pruned["defend_arg"] == 4.0 and pruned["defend_time_s"] == 12.5 and pruned["pretrained_acc"] == 81.234
    assert is_nan(pruned["setting"]) and is_nan(pruned["Conf_acc"]) and is_nan(pruned["SAMIA_acc"])

    every = same_table_three_ways(tmp_path, newest_only=False)
    moved = every[every["Conf_acc"].notna()].iloc[0]
    assert (moved["defense"], moved["setting"], moved["pretrained_acc"]) == ("base", "original", 81.625)
    # ppb's prune time is not the unpruned model's
    assert is_nan(moved["defend_arg"]) and is_nan(moved["defend_time_s"])
    assert not ((every["defense"] == "ppb") & (every["setting"] == "original")).any()

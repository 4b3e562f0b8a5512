"""The log header lines that say what a defense's settings mean on this data (window share and full
pass; the risk side of --mem_thre), and that the results parser reads logs holding them as before."""

import math

import pytest
import torch

from auto_settings import window_rule
from defenses import ML2, DefenseSettings, RandomWindow, SlideML2
from reporting import results


def literal_full_pass(largest, stride, width):
    """Epochs until some window has reached the last position of the largest class, one epoch at a time."""
    epoch = 0
    while not stride * epoch <= largest - 1 < stride * epoch + width and stride * epoch + width < largest:
        epoch += 1
    return epoch + 1


@pytest.mark.parametrize(
    "sizes, stride, width", [([90, 100, 108], 2, 20), ([59, 70], 1, 15), ([30], 5, 40), ([10, 11], 3, 2), ([100], 7, 7)]
)
def test_full_pass_matches_the_epoch_by_epoch_count(sizes, stride, width):
    line = window_rule(sizes, stride, width, 21)
    assert f"a full pass in {literal_full_pass(max(sizes), stride, width)} epochs " in line


def test_window_line_exactly():
    assert window_rule([100, 90, 108], 2, 20, 21) == (
        "Window: stride 2, width 20 = 22% of the smallest class (90 samples); a full pass in 45 epochs "
        "(largest class 108 samples; 21 epochs per pruning iteration)"
    )
    labels = torch.tensor([0] * 59 + [1] * 70 + [2] * 64)
    assert RandomWindow.header_lines(DefenseSettings(stride=1, width=15, prune_epochs=21), labels) == [
        "Window: stride 1, width 15 = 25% of the smallest class (59 samples); a full pass in 56 epochs "
        "(largest class 70 samples; 21 epochs per pruning iteration)"
    ]


def test_risk_side_count_and_the_warning_past_half():
    train_scores = torch.tensor([0.9, 0.7, 0.5, 0.5, 0.2, 0.1, 0.0, 0.0], dtype=torch.float64)
    victim = train_scores[:4]
    lines = ML2.header_lines(DefenseSettings(mem_thre=0.5), torch.zeros(4), victim, train_scores)
    assert lines == [
        "Risk side: 4 of 8 training samples (50.0%) have a mem-score >= --mem_thre 0.5; the victim's: 4 of 4"
    ]  # exactly half: no warning
    lines = ML2.header_lines(DefenseSettings(mem_thre=0.2), torch.zeros(4), victim, train_scores)
    assert lines == [
        "Risk side: 5 of 8 training samples (62.5%) have a mem-score >= --mem_thre 0.2; the victim's: 4 of 4",
        "Warning: --mem_thre 0.2 puts more than half of the training set on the risk side; it is meant "
        "to mark a tail of high mem-scores: choose it from the scores' distribution (docs/defenses.md)",
    ]
    both = SlideML2.header_lines(
        DefenseSettings(stride=1, width=2, mem_thre=0.9, prune_epochs=3),
        torch.tensor([0, 0, 1, 1]),
        victim,
        train_scores,
    )
    assert both == [
        "Window: stride 1, width 2 = 100% of the smallest class (2 samples); a full pass in 1 epochs "
        "(largest class 2 samples; 3 epochs per pruning iteration)",
        "Risk side: 1 of 8 training samples (12.5%) have a mem-score >= --mem_thre 0.9; the victim's: 1 of 4",
    ]


LOG = """\
Victim original model test accuracy: 81.500
Shadows: original
Semantics: release
Conf attack accuracy: 66.000
digits_columnfc_iter_prunetxt_0.6_slide_ml2_1-15_0.1
Semantics: release
{header}Pretrained Victim: Accuracy 81.234, Loss 0.567
victim iter 0 best model: Accuracy 78.000, Loss 0.700
Total slide_ml2 defend time: 100.5s
Victim pruned model test accuracy: 78.900
Shadows: iter_prunetxt_0.6_slide_ml2 (adaptive)
Semantics: release
Conf attack accuracy: 54.000
"""
HEADER = """\
Window: stride 1, width 15 = 25% of the smallest class (59 samples); a full pass in 56 epochs (largest class 70 \
samples; 21 epochs per pruning iteration)
Risk side: 1000 of 1437 training samples (69.6%) have a mem-score >= --mem_thre 0.3; the victim's: 250 of 359
Warning: --mem_thre 0.3 puts more than half of the training set on the risk side; it is meant to mark a tail of \
high mem-scores: choose it from the scores' distribution (docs/defenses.md)
"""


def test_results_parser_reads_logs_with_the_header_lines(tmp_path):
    """The same rows with and without the new lines (the unpruned attack first, as grid.py now runs it)."""
    rows = {}
    for name, header in (("old", ""), ("new", HEADER)):
        path = tmp_path / name / "iter_prunetxt_0.6_slide_ml2.txt"
        path.parent.mkdir()
        path.write_text(LOG.format(header=header))
        rows[name] = [
            {k: v for k, v in row.items() if not k.startswith("_")}
            for row in results.parse_file(str(path), "digits", "columnfc")
        ]
    assert rows["new"] == rows["old"]
    original, pruned = rows["new"]
    assert (original["setting"], original["victim_acc"], original["Conf_acc"]) == ("original", 81.5, 66.0)
    assert (pruned["setting"], pruned["window"], pruned["weight_decay_mem"]) == ("adaptive", "1-15", 0.1)
    assert (pruned["pretrained_acc"], pruned["defend_time_s"], pruned["Conf_acc"]) == (81.234, 100.5, 54.0)
    assert math.isclose(pruned["victim_acc"], 78.9)

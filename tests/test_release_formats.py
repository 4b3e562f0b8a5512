"""Checkpoints in the paper's release formats load wherever ours do: a pruned best.pth that is a plain
state_dict, and a best_mask.pth that maps layer names to {"weight": mask, "bias": mask}."""

import os
import re
from types import SimpleNamespace

import pytest
import torch

from common import MissingError
from conftest import REPO, run_script
from helpers import attack_cmd, pretrain_cmd, prune_cmd, run_scripts
from models import build_model
from pruning import load_masks
from reporting import results
from train import load_model

DIGITS = os.path.join(REPO, "config", "digits.json")
DIGITS_ARGS = SimpleNamespace(model_name="columnfc", num_cls=10, input_dim=64)
RUN = os.path.join("result", "digits_columnfc")
PRUNED = ["iter_prunetxt_0.6_model", "shadow_iter_prunetxt_0.6_model_0"]  # the victim's and the shadow's
LOG = os.path.join("log", "digits_columnfc", "iter_prunetxt_0.6_base.txt")


def release_masks(masks, state):
    """Our {name: weight mask} in the release's format, with all-ones bias masks."""
    return {name: {"weight": mask, "bias": torch.ones_like(state[f"{name}.bias"])} for name, mask in masks.items()}


def test_release_best_pth_loads_with_identical_logits(tmp_path):
    torch.manual_seed(0)
    model = build_model("columnfc", 10, 64).eval()
    torch.save(model.state_dict(), tmp_path / "best.pth")
    loaded, ckpt = load_model(DIGITS_ARGS, str(tmp_path / "best.pth"), torch.device("cpu"), "checkpoint", "rerun")
    assert set(ckpt) == set(model.state_dict())  # the plain state_dict itself, no {epoch, acc, loss, state}
    x = torch.rand(50, 64)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), model(x))


def test_load_masks_reads_both_formats(tmp_path):
    model = build_model("columnfc", 10, 64)
    state = model.state_dict()
    ours = {name: (torch.rand_like(state[f"{name}.weight"]) > 0.5).float() for name in ("fc1", "fc2")}
    torch.save(ours, tmp_path / "ours.pth")
    torch.save(release_masks(ours, state), tmp_path / "release.pth")
    torch.save({"fc1": {"weight": ours["fc1"], "bias": None}}, tmp_path / "no_bias.pth")  # a layer without bias
    for name, expected in (("ours", ours), ("release", ours), ("no_bias", {"fc1": ours["fc1"]})):
        masks = load_masks(str(tmp_path / f"{name}.pth"))
        assert set(masks) == set(expected) and all(torch.equal(masks[k], expected[k]) for k in expected)


@pytest.mark.parametrize(
    "content",
    [
        torch.ones(3),  # not a dict
        {},  # no masks
        {"fc1": [1, 0]},  # not a tensor
        {"fc1": {"bias": torch.ones(3)}},  # no weight mask
        {"fc1": {"weight": None, "bias": None}},
        {"epoch": 3, "state": {}},  # a best.pth, not a mask file
    ],
    ids=["tensor", "empty", "list", "no-weight", "weight-none", "checkpoint"],
)
def test_load_masks_rejects_anything_else(tmp_path, content):
    path = tmp_path / "best_mask.pth"
    torch.save(content, path)
    with pytest.raises(MissingError, match="mask") as err:
        load_masks(str(path), fix="rerun prune_modi.py")
    assert "\n" not in str(err.value) and str(path) in str(err.value) and "rerun prune_modi.py" in str(err.value)


def test_load_masks_of_a_missing_or_broken_file(tmp_path):
    with pytest.raises(MissingError, match="not found"):
        load_masks(str(tmp_path / "none.pth"))
    (tmp_path / "junk.pth").write_bytes(b"\x00junk")
    with pytest.raises(MissingError, match="corrupt"):
        load_masks(str(tmp_path / "junk.pth"))


def attack_lines(folder):
    """The log lines of the last attack run: from its victim accuracy line on."""
    lines = (folder / LOG).read_text().splitlines()
    start = max(i for i, line in enumerate(lines) if line.startswith("Victim pruned model test accuracy"))
    return [
        re.sub(r"\d{8}T\d{12}Z_[\w-]+_\d+", "<run id>", line)  # the run id in the scores file's name
        for line in lines[start:]
    ]


@pytest.mark.slow
def test_release_format_pruned_checkpoints_attack_like_ours(tmp_path):
    """Prune a tiny digits run, attack it, rewrite the pruned victim's and shadow's files in the
    release's formats, attack again: the same numbers."""
    mia = attack_cmd(1, "--no_tensorboard")
    run_scripts(pretrain_cmd(1, 1), prune_cmd(1, 1, "--no_tensorboard"), mia, cwd=tmp_path)
    ours = attack_lines(tmp_path)
    assert any(" attack accuracy: " in line for line in ours)

    for folder in PRUNED:
        best, mask = tmp_path / RUN / folder / "best.pth", tmp_path / RUN / folder / "best_mask.pth"
        state = torch.load(best, weights_only=True)["state"]
        masks = load_masks(str(mask))
        assert set(masks) == {"fc1", "fc2"}
        torch.save(state, best)
        torch.save(release_masks(masks, state), mask)
        (tmp_path / RUN / folder / "complete.json").unlink()  # the release writes no completion record
        assert all(torch.equal(m, masks[k]) for k, m in load_masks(str(mask)).items())

    proc = run_script(*mia, cwd=tmp_path)
    assert proc.returncode == 0
    assert proc.stderr.splitlines() == [
        f"warning: 2 checkpoint(s) have no completion record and are taken as made by the paper's release "
        f"(a plain state_dict), e.g. {RUN}/{PRUNED[0]}/best.pth"
    ]
    assert attack_lines(tmp_path) == ours
    rows = results.parse_logs(tmp_path / "log", newest_only=False)  # our real log, read back
    attacked = rows[rows["setting"] == "base"]
    assert list(attacked["semantics"]) == ["release", "release"] and attacked["Conf_acc"].nunique() == 1

"""pruning.py: the sparsity schedule, per-layer magnitude masks, masks held through training, export."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from common import UsageError
from models import ColumnFC, release_init
from pruning import Pruner, check_pruning_flags, magnitude_mask, prunable_layers, sparsity_schedule
from train import load_checkpoint


def columnfc(seed=0):
    torch.manual_seed(seed)
    return release_init(ColumnFC(64, 10))


def small_convnet():
    return release_init(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5)))


def adam_steps(model, steps, x, y):
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=5e-4)
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_schedule_values():
    got = sparsity_schedule("iter_pruning", 0.6, 5)
    assert [round(s, 4) for s in got] == [0, 0.2047, 0.3675, 0.4970, 0.6]
    assert got[-1] == pytest.approx(0.6, abs=1e-12)
    assert sparsity_schedule("iter_prunetxt", 0.6, 5) == got
    assert sparsity_schedule("l1unstructure", 0.6, 5) == [0.6]
    assert sparsity_schedule("iter_pruning", 0.5, 3) == pytest.approx([0, 1 - 0.5**0.5, 0.5])


def reference_mask(weight, mask, sparsity):
    """NNI's level pruner literally: w = weight * mask, k = int(numel * s); all ones if k == 0, else
    keep |w| > the k-th smallest |w|."""
    w = (weight * mask).abs().flatten().tolist()
    k = int(len(w) * sparsity)
    if k == 0:
        return torch.ones_like(weight)
    threshold = sorted(w)[k - 1]
    return torch.tensor([float(v > threshold) for v in w]).view_as(weight)


def test_ties_at_threshold_are_all_pruned():
    weight = torch.tensor([[1.0, -2.0, 2.0, 2.0, 3.0], [4.0, -5.0, 6.0, 7.0, 8.0]])
    mask = magnitude_mask(weight, torch.ones_like(weight), 0.2)  # k = 2: 2nd smallest |w| is 2
    assert mask.tolist() == [[0, 0, 0, 0, 1], [1, 1, 1, 1, 1]]
    gen = torch.Generator().manual_seed(1)
    for trial in range(30):  # many ties, an existing mask, several sparsities
        weight = torch.randint(-4, 5, (7, 9), generator=gen).float()
        old = (torch.rand(7, 9, generator=gen) > 0.3).float()
        s = [0.0, 0.01, 0.2, 0.5, 0.9][trial % 5]
        assert torch.equal(magnitude_mask(weight, old, s), reference_mask(weight, old, s))


@pytest.mark.parametrize("model_fn,expected_layers", [(columnfc, {"fc1", "fc2", "fc3"}), (small_convnet, {"0", "3"})])
def test_each_layer_gets_exactly_k_zeros(model_fn, expected_layers):
    torch.manual_seed(3)
    model = model_fn().double()  # float64 weights: no accidental ties, before or after training
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.1 * torch.randn_like(p))
    pruner = Pruner(model, "iter_pruning", 0.6, 5)
    assert set(pruner.layers) == expected_layers
    biases = {n: m.bias.detach().clone() for n, m in pruner.layers.items()}
    shape = (16, 64) if model_fn is columnfc else (16, 3, 8, 8)
    x, y = torch.rand(shape, dtype=torch.float64), torch.randint(0, 5, (16,))
    for t, s_t in enumerate(pruner.schedule):
        for _name, layer in pruner.layers.items():
            alive = layer.weight.detach()[layer.weight != 0].abs()
            assert alive.unique().numel() == alive.numel()  # tie-free apart from the pruned zeros
        pruner.prune(t)
        for name, layer in pruner.layers.items():
            k = int(layer.weight.numel() * s_t)
            assert int((layer.weight == 0).sum()) == k, (name, t)
            assert int((pruner.masks[name] == 0).sum()) == k
        if t == 0:
            assert all(torch.equal(m.bias, biases[n]) for n, m in pruner.layers.items())  # biases never masked
        adam_steps(model, 3, x, y)  # masked weights move off zero between iterations (see below)
        with torch.no_grad():  # let the next prune see the masked weights, as the next forward would
            model(x)


def test_masked_weights_zero_in_every_forward():
    model = columnfc()
    pruner = Pruner(model, "iter_pruning", 0.6, 3)
    pruner.prune(1)
    pruner.prune(2)
    seen = []

    def record(module, inputs, name):  # registered after the pruner's hook, so it sees what forward uses
        seen.append(float((module.weight.detach() * (1 - pruner.masks[name])).abs().max()))

    for name, layer in pruner.layers.items():
        layer.register_forward_pre_hook(lambda m, i, name=name: record(m, i, name))

    x, y = torch.rand(32, 64), torch.randint(0, 10, (32,))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    moved = 0.0
    for _ in range(5):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        moved = max(moved, float((model.fc1.weight.detach() * (1 - pruner.masks["fc1"])).abs().max()))
    assert moved > 0  # Adam does move pruned weights between forwards...
    assert len(seen) == 15 and max(seen) == 0.0  # ...and every forward runs with them at zero
    assert int((pruner.masks["fc2"] == 0).sum()) == int(256 * 128 * 0.6)


def test_l1unstructure_is_one_step_at_target():
    model = columnfc()
    pruner = Pruner(model, "l1unstructure", 0.6, 5)
    assert pruner.schedule == [0.6]
    pruner.prune(0)
    for _name, layer in pruner.layers.items():
        assert int((layer.weight == 0).sum()) == int(layer.weight.numel() * 0.6)


def test_iter_prunetxt_touches_only_fc1_fc2():
    model = columnfc()
    fc3_before = {k: v.clone() for k, v in model.fc3.state_dict().items()}
    pruner = Pruner(model, "iter_prunetxt", 0.6, 3)
    assert set(pruner.layers) == {"fc1", "fc2"}
    for t in range(3):
        pruner.prune(t)
    assert int((model.fc1.weight == 0).sum()) == int(64 * 256 * 0.6)
    assert int((model.fc2.weight == 0).sum()) == int(256 * 128 * 0.6)
    assert all(torch.equal(v, fc3_before[k]) for k, v in model.fc3.state_dict().items())
    assert int((model.fc3.weight == 0).sum()) == 0


def test_iter_prunetxt_needs_fc1_fc2_and_unknown_pruner():
    with pytest.raises(UsageError, match="fc1/fc2.*iter_pruning") as err:
        Pruner(small_convnet(), "iter_prunetxt", 0.6, 5)
    assert "\n" not in str(err.value)
    with pytest.raises(UsageError, match="unknown pruner_name 'magic'"):
        prunable_layers(columnfc(), "magic")


def test_export_loads_into_fresh_unpruned_model(tmp_path):
    model = columnfc()
    pruner = Pruner(model, "iter_pruning", 0.6, 5)
    x, y = torch.rand(40, 64), torch.randint(0, 10, (40,))
    for t in range(3):
        pruner.prune(t)
        adam_steps(model, 4, x, y)
    # right after an optimizer step the raw pruned weights are non-zero: export must mask them
    assert float((model.fc1.weight.detach() * (1 - pruner.masks["fc1"])).abs().max()) > 0
    pruner.export(str(tmp_path), epoch=3, acc=91.5, loss=0.25)

    ckpt = torch.load(tmp_path / "best.pth", weights_only=True)
    assert set(ckpt) == {"epoch", "acc", "loss", "state"}
    assert (ckpt["epoch"], ckpt["acc"], ckpt["loss"]) == (3, 91.5, 0.25)
    fresh = ColumnFC(64, 10)
    assert set(ckpt["state"]) == set(fresh.state_dict())
    load_checkpoint(fresh, str(tmp_path / "best.pth"), "checkpoint", "rerun")
    model.eval(), fresh.eval()
    probe = torch.rand(100, 64)
    with torch.no_grad():
        assert torch.equal(fresh(probe), model(probe))
    for name in ("fc1", "fc2", "fc3"):
        weight = getattr(fresh, name).weight
        assert int((weight == 0).sum()) == int(weight.numel() * pruner.schedule[2])

    masks = torch.load(tmp_path / "best_mask.pth", weights_only=True)
    assert set(masks) == set(pruner.layers) == {"fc1", "fc2", "fc3"}
    for name, mask in masks.items():
        assert torch.equal(mask, pruner.masks[name])
        assert torch.equal(getattr(fresh, name).weight == 0, mask == 0)


def test_export_mask_keys_for_prunetxt(tmp_path):
    model = columnfc()
    pruner = Pruner(model, "iter_prunetxt", 0.6, 2)
    pruner.prune(1)
    pruner.export(str(tmp_path), 0, 50.0, 1.0)
    assert set(torch.load(tmp_path / "best_mask.pth", weights_only=True)) == {"fc1", "fc2"}


@pytest.mark.parametrize("pruner_name", ["iter_prunetxt", "l1unstructure"])
def test_sparsity_zero_is_the_fine_tuning_control_no_weight_removed(pruner_name):
    """--prune_sparsity 0 is accepted and keeps the schedule's length (the same fine-tuning epochs), but every
    iteration's sparsity is 0, so every mask stays all ones and the weights are untouched; 1 and below 0 are
    refused."""
    check_pruning_flags(pruner_name, 0.0)
    for bad in (1.0, -0.1):
        with pytest.raises(UsageError, match=r"--prune_sparsity must be in \[0, 1\) \(0: fine-tuned, not pruned\)"):
            check_pruning_flags(pruner_name, bad)
    model = columnfc()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruner = Pruner(model, pruner_name, 0.0, 5)
    assert pruner.schedule == ([0.0] * 5 if pruner_name == "iter_prunetxt" else [0.0])
    for iteration in range(len(pruner.schedule)):
        pruner.prune(iteration)
    assert all(bool((mask == 1).all()) for mask in pruner.masks.values())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

"""--semantics release vs corrected for the defenses that train differently under it (docs/differences.md:
Differences from the paper's release): the RSW/SWMR windows, adv and dp. Each release rule is checked
against a plain-Python reference written from its description, and corrected against today's rule."""
import math
import os
import random

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from opacus.accountants import RDPAccountant

import defenses
import dp as dp_module
import train
from common import UsageError
from conftest import REPO
from datasets import TensorData
from defenses import Adv, DefenseSettings, Dp, Slide, SlideML2, window_at
from dp import dp_gradient
from models import ColumnFC, build_model
from splits import ModelSplit


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: extra threads only fight over the shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- references, from the descriptions

def release_window(groups, stride, width, epoch):
    """One end for all classes, lowered to each class's length in class order."""
    start = stride * epoch
    end = start + width
    window = []
    for group in groups:
        end = min(end, len(group))
        if start < end:
            window += group[start:end]
    return window


def corrected_window(groups, stride, width, epoch):
    """Each class clipped to its own length."""
    start = stride * epoch
    window = []
    for group in groups:
        window += group[start:min(start + width, len(group))]
    return window


def release_dev_batches(dev, batch_size, steps=7):
    """The first `steps` batches of an unshuffled loader over dev (the last one may be partial)."""
    batches = []
    for k in range(steps):
        batch = dev[k * batch_size:(k + 1) * batch_size]
        if not batch:
            break
        batches.append(batch)
    return batches


# ---------------------------------------------------------------- windows

def window_task(sizes, seed=0, **overrides):
    """A Slide defense over classes of the given sizes (shuffled training list, distinct random scores),
    and its class groups worked out in plain Python (each class by descending score)."""
    rng = random.Random(seed)
    labels = [c for c, size in enumerate(sizes) for _ in range(size)]
    rng.shuffle(labels)
    n = len(labels)
    train_list = list(range(n))
    rng.shuffle(train_list)
    scores = rng.sample(range(10 * n), n)
    groups = [sorted((i for i in train_list if labels[i] == c), key=lambda i: -scores[i]) for c in range(len(sizes))]
    data = TensorData(torch.rand(n, 4), torch.tensor(labels))
    split = ModelSplit(torch.tensor(train_list), torch.arange(0), torch.arange(0))
    settings = dict(stride=1, width=3, num_cls=len(sizes), batch_size=4, prune_epochs=3, mem_thre=0.5 * 10 * n)
    settings.update(overrides)
    memscores = torch.tensor(scores, dtype=torch.float64)
    make = lambda cls, semantics: cls(build_model("columnfc", len(sizes), 4), data, split,
                                      DefenseSettings(semantics=semantics, **settings), memscores)
    return make, groups


def test_shared_end_on_a_short_middle_class():
    make, groups = window_task([5, 2, 5])
    release, corrected = make(Slide, "release"), make(Slide, "corrected")
    epochs = range(6)
    assert [release.window_indices(e).tolist() for e in epochs] == [release_window(groups, 1, 3, e) for e in epochs]
    assert [corrected.window_indices(e).tolist() for e in epochs] == [corrected_window(groups, 1, 3, e) for e in epochs]
    # by hand: class 1 (2 samples) caps class 2's window, and from epoch 2 on empties it
    assert [len(release.window_indices(e)) for e in epochs] == [3 + 2 + 2, 3 + 1 + 1, 3, 2, 1, 0]
    assert [len(corrected.window_indices(e)) for e in epochs] == [3 + 2 + 3, 3 + 1 + 3, 3 + 3, 2 + 2, 1 + 1, 0]
    plain = [torch.tensor(group) for group in groups]
    assert window_at(plain, 1, 3, 1, shared_end=True).tolist() == release_window(groups, 1, 3, 1)
    assert window_at(plain, 1, 3, 1).tolist() == corrected_window(groups, 1, 3, 1)


def test_shared_end_on_a_location_like_set():
    rng = random.Random(1)
    sizes = [rng.randint(8, 80) for _ in range(30)]
    make, groups = window_task(sizes, seed=1, width=15, prune_epochs=21)
    release, corrected = make(Slide, "release"), make(Slide, "corrected")
    got_release = [release.window_indices(e).tolist() for e in range(21)]
    got_corrected = [corrected.window_indices(e).tolist() for e in range(21)]
    assert got_release == [release_window(groups, 1, 15, e) for e in range(21)]
    assert got_corrected == [corrected_window(groups, 1, 15, e) for e in range(21)]
    assert sum(a != b for a, b in zip(got_release, got_corrected)) >= 1
    # class 15 has 8 samples: the larger classes after it lose samples in every epoch, as in docs/differences.md
    assert sizes[15] == 8 and all(len(a) < len(b) for a, b in zip(got_release, got_corrected))


def test_rsw_release_epoch_past_the_shared_end_trains_nothing():
    make, groups = window_task([2, 5, 5])
    assert release_window(groups, 1, 3, 2) == [] and corrected_window(groups, 1, 3, 2) != []
    release, corrected = make(Slide, "release"), make(Slide, "corrected")
    before = {k: v.clone() for k, v in release.model.state_dict().items()}
    loss, acc = release.train_epoch(2)
    assert math.isnan(loss) and math.isnan(acc)
    assert all(torch.equal(before[k], v) for k, v in release.model.state_dict().items())
    assert not math.isnan(corrected.train_epoch(2)[0])


@pytest.mark.parametrize("semantics", ["release", "corrected"])
@pytest.mark.parametrize("prune_epochs", [2, 3, 6])
def test_swmr_refuses_by_its_semantics_rule(semantics, prune_epochs):
    make, groups = window_task([2, 5, 5], prune_epochs=prune_epochs)
    rule = release_window if semantics == "release" else corrected_window
    refused = rule(groups, 1, 3, prune_epochs - 1) == []
    by_hand = {("release", 2): False, ("release", 3): True, ("release", 6): True,
               ("corrected", 2): False, ("corrected", 3): False, ("corrected", 6): True}
    assert refused == by_hand[semantics, prune_epochs]
    if refused:
        with pytest.raises(UsageError, match=f"window of epoch {prune_epochs - 1} starts at {prune_epochs - 1}, past"):
            make(SlideML2, semantics)
    else:
        make(SlideML2, semantics)


@pytest.mark.parametrize("semantics", ["release", "corrected"])
def test_swmr_trains_on_its_semantics_window(monkeypatch, semantics):
    make, groups = window_task([5, 2, 5])
    defense = make(SlideML2, semantics)
    seen = []
    monkeypatch.setattr(defenses, "train_pass",
                        lambda model, data, idx, opt, bs: seen.extend(idx.tolist()) or (1.0, 50.0))
    defense.train_epoch(1)
    rule = release_window if semantics == "release" else corrected_window
    assert sorted(seen) == sorted(rule(groups, 1, 3, 1))
    assert len(seen) == {"release": 5, "corrected": 7}[semantics]


# ---------------------------------------------------------------- adv

def random_task(n_train=64, n_dev=64, dim=64, num_cls=10, seed=0):
    """Random features and labels; the dev list is shuffled, so "in order" is not index order."""
    g = torch.Generator().manual_seed(seed)
    n = n_train + n_dev
    data = TensorData(torch.rand(n, dim, generator=g), torch.randint(0, num_cls, (n,), generator=g))
    dev = n_train + torch.randperm(n_dev, generator=g)
    return data, ModelSplit(torch.arange(n_train), dev, dev)


def adv_settings(semantics, **overrides):
    settings = dict(num_cls=10, batch_size=16, defend_arg=1.0, optimizer="adam", lr=1e-3, weight_decay=5e-4,
                    semantics=semantics)
    settings.update(overrides)
    return DefenseSettings(**settings)


def step_counter(optimizer):
    steps = []
    optimizer.register_step_post_hook(lambda opt, args, kwargs: steps.append(1))
    return steps


def record_adv(monkeypatch, adv):
    """(features calls, classifier train_pass calls and results, inference steps, classifier steps)."""
    features, passes = [], []
    original_features, original_pass = Adv.features, defenses.train_pass
    monkeypatch.setattr(Adv, "features",
                        lambda self, idx: features.append(idx.tolist()) or original_features(self, idx))

    def recorded_pass(*args, **kwargs):
        result = original_pass(*args, **kwargs)
        passes.append((args[2].tolist(), result))
        return result
    monkeypatch.setattr(defenses, "train_pass", recorded_pass)
    return features, passes, step_counter(adv.inference_optimizer), step_counter(adv.optimizer)


@pytest.mark.parametrize("n_dev, expected_steps", [(200, 7), (40, 3)], ids=["long dev set", "short dev set"])
def test_adv_release_epoch(monkeypatch, n_dev, expected_steps):
    torch.manual_seed(0)
    data, split = random_task(n_dev=n_dev)
    adv = Adv(ColumnFC(64, 10), data, split, adv_settings("release"))
    features, passes, inference_steps, classifier_steps = record_adv(monkeypatch, adv)
    train_list, dev = split.train.tolist(), split.dev.tolist()
    expected_others = release_dev_batches(dev, 16)
    assert len(expected_others) == expected_steps
    for epoch in range(2):
        for log in (features, passes, inference_steps, classifier_steps):
            log.clear()
        result = adv.train_epoch(epoch)
        assert len(inference_steps) == expected_steps and len(classifier_steps) == 1
        members, others = features[0::2], features[1::2]
        assert others == expected_others  # dev[0:16], dev[16:32], ... in the dev list's order, every epoch
        assert all(len(m) == 16 == len(set(m)) and set(m) <= set(train_list) for m in members)
        assert len(members) == expected_steps
        [(batch, pass_result)] = passes
        assert len(batch) == 16 == len(set(batch)) and set(batch) <= set(train_list)
        assert result == pass_result  # that one batch's (loss, accuracy %)


def test_adv_corrected_runs_full_epochs(monkeypatch):
    torch.manual_seed(0)
    data, split = random_task(n_dev=200)
    adv = Adv(ColumnFC(64, 10), data, split, adv_settings("corrected"))
    features, passes, inference_steps, classifier_steps = record_adv(monkeypatch, adv)
    adv.train_epoch(0)
    assert (len(inference_steps), len(classifier_steps)) == (4 * 7, 64 // 16) != (7, 1)
    assert features[1::2] != release_dev_batches(split.dev.tolist(), 16)  # random dev batches, not in order


# ---------------------------------------------------------------- dp

def dp_settings(semantics, **overrides):
    settings = dict(num_cls=10, batch_size=16, defend_arg=1.0, optimizer="adam", lr=0.05, weight_decay=1e-3,
                    epochs=3, semantics=semantics)
    settings.update(overrides)
    return DefenseSettings(**settings)


def bn_model():
    """A small conv net with BatchNorm2d (its microbatch gradients take the loop path)."""
    return nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 10))


def test_dp_release_optimizer_is_momentum_free_sgd():
    data, split = random_task(n_train=70)
    model = ColumnFC(64, 10)
    dp = Dp(model, data, split, dp_settings("release"))
    assert type(dp.optimizer) is torch.optim.SGD
    group = dp.optimizer.param_groups[0]
    assert (group["momentum"], group["lr"], group["weight_decay"], group["nesterov"]) == (0, 0.05, 1e-3, False)
    assert [id(p) for p in group["params"]] == [id(p) for p in model.parameters()]
    assert type(Dp(ColumnFC(64, 10), data, split, dp_settings("corrected")).optimizer) is torch.optim.Adam


@pytest.mark.filterwarnings("ignore:Optimal order is the smallest alpha")
@pytest.mark.parametrize("semantics, per_epoch", [("release", 70 // 16 * 3), ("corrected", 70 // 16)])
def test_dp_accountant_steps_per_epoch(monkeypatch, semantics, per_epoch):
    torch.manual_seed(0)
    data, split = random_task(n_train=70)
    dp = Dp(ColumnFC(64, 10), data, split, dp_settings(semantics))
    calls = []
    original = defenses.dp_gradient
    monkeypatch.setattr(defenses, "dp_gradient", lambda *args: calls.append(1) or original(*args))
    dp.train_epoch(0)
    assert dp.accountant.history == [(1.0, 16 / 70, per_epoch)] and len(calls) == per_epoch
    dp.train_epoch(1)
    assert dp.accountant.history == [(1.0, 16 / 70, 2 * per_epoch)]
    reference = RDPAccountant()
    for _ in range(2 * per_epoch):
        reference.step(noise_multiplier=1.0, sample_rate=16 / 70)
    assert dp.epsilon() == reference.get_epsilon(delta=1e-5)
    assert dp.iteration_summary().startswith("DP epsilon: ")


@pytest.mark.parametrize("semantics", ["release", "corrected"])
@pytest.mark.parametrize("make_model, path", [(lambda: ColumnFC(64, 10), "vmap"), (bn_model, "loop")],
                         ids=["vmap", "loop (BatchNorm)"])
def test_dp_microbatches(monkeypatch, semantics, make_model, path):
    """Every step's microbatch sizes, as the gradient generators yield them, against the rule."""
    torch.manual_seed(0)
    data, split = random_task(n_train=70)
    dp = Dp(make_model(), data, split, dp_settings(semantics, epochs=2))
    steps = []  # per step: (Poisson batch size, microbatch sizes seen)
    original = defenses.dp_gradient
    monkeypatch.setattr(defenses, "dp_gradient", lambda model, x, y, *rest: steps.append((len(y), [])) or
                        original(model, x, y, *rest))
    for name in ("_microbatch_grads_vmap", "_microbatch_grads_loop"):
        def recorded(model, x, y, microbatch, generator=getattr(dp_module, name), name=name):
            for grads, logits, labels in generator(model, x, y, microbatch):
                count = next(iter(grads.values())).shape[0]
                steps[-1][1].extend([len(labels) // count] * count)
                assert name.endswith(path)
                yield grads, logits, labels
        monkeypatch.setattr(dp_module, name, recorded)
    dp.train_epoch(0)
    assert len(steps) == 70 // 16 * (2 if semantics == "release" else 1)
    assert any(size % 8 for size, _ in steps)  # some steps have a partial microbatch to drop or keep
    for size, seen in steps:
        if semantics == "release":
            assert seen == [8] * (size // 8)
        else:
            assert seen == [8] * (size // 8) + ([size % 8] if size % 8 else [])


@pytest.mark.parametrize("make_model", [lambda: ColumnFC(64, 10), bn_model], ids=["vmap", "loop (BatchNorm)"])
def test_dp_gradient_drop_partial_leaves_out_the_last_partial_microbatch(make_model):
    torch.manual_seed(0)
    model = make_model().eval()  # eval: the reference and the tested path see the same function
    x, y = torch.rand(7, 64) * 3, torch.randint(0, 10, (7,))
    clipped, loss_sum = [], 0.0
    for start in (0, 3):  # microbatches [0:3], [3:6]; example 6 is left out
        xb, yb = x[start:start + 3], y[start:start + 3]
        model.zero_grad()
        loss = F.cross_entropy(model(xb), yb)
        loss.backward()
        g = torch.cat([p.grad.flatten() for p in model.parameters()])
        clipped.append(g * min(1.0, 1.0 / g.norm().item()))
        loss_sum += 3 * loss.item()
    reference = (clipped[0] + clipped[1]) * 3 / 9
    got_loss, _ = dp_gradient(model, x, y, 3, 9, 1.0, 0.0, drop_partial=True)
    got = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert torch.allclose(got, reference, atol=1e-6)
    assert got_loss.item() == pytest.approx(loss_sum, rel=1e-5)
    dp_gradient(model, x, y, 3, 9, 1.0, 0.0)
    kept = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert not torch.allclose(kept, reference, atol=1e-6)


@pytest.mark.parametrize("semantics", ["release", "corrected"])
def test_dp_model_mode_across_fit(monkeypatch, semantics):
    torch.manual_seed(0)
    data, split = random_task(n_train=64)
    model = ColumnFC(64, 10)
    dp = Dp(model, data, split, dp_settings(semantics, epochs=1))
    modes = []
    original = defenses.dp_gradient
    monkeypatch.setattr(defenses, "dp_gradient", lambda model, *rest: modes.append(model.training) or
                        original(model, *rest))
    assert model.training  # fresh, as from loading
    train.fit(model, dp.train_epoch, data, split.dev, split.test, 2, 0, on_best=lambda *args: None)
    per_epoch = 64 // 16
    expected = {"release": [True] * per_epoch + [False] * per_epoch, "corrected": [True] * (2 * per_epoch)}
    assert modes == expected[semantics]


def test_dp_microbatch_flag_is_corrected_only():
    Dp.check_args(dp_settings("corrected", dp_microbatch=4))
    Dp.check_args(dp_settings("release"))
    with pytest.raises(UsageError, match="--dp_microbatch is a --semantics corrected flag"):
        Dp.check_args(dp_settings("release", dp_microbatch=4))
    import prune_modi  # here, not at the top: the scripts import far more than the other tests need
    digits = os.path.join(REPO, "config", "digits.json")
    with pytest.raises(UsageError, match="--dp_microbatch is a --semantics corrected flag"):
        prune_modi.get_args(["-1", digits, "--defend", "dp", "--defend_arg", "1", "--dp_microbatch", "4"])


@pytest.mark.parametrize("semantics, steps", [("release", 646 // 128 * 100), ("corrected", 646 // 128)])
def test_dp_steps_per_epoch_for_the_digits_victim(semantics, steps):
    """The scripts' settings for digits (batch_size 128, epochs 100) on a victim of 646 training samples."""
    import prune_modi
    args = prune_modi.get_args(["-1", os.path.join(REPO, "config", "digits.json"), "--defend", "dp",
                                "--defend_arg", "0.1", "--semantics", semantics])
    data = TensorData(torch.rand(700, 64), torch.randint(0, 10, (700,)))
    split = ModelSplit(torch.arange(646), torch.arange(646, 700), torch.arange(646, 700))
    dp = Dp(ColumnFC(64, 10), data, split, DefenseSettings.from_args(args))
    assert dp.steps == steps == {"release": 500, "corrected": 5}[semantics]

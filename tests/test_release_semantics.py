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
from helpers import bn_model
from helpers import one_thread as torch_on_one_thread
from models import ColumnFC, build_model
from splits import ModelSplit


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: extra threads only fight over the shared cores."""
    with torch_on_one_thread():
        yield


# ---------------------------------------------------------------- references, from the descriptions


def release_window(groups, stride, width, epoch):
    """Per class in class order: skip the class when start >= its length, and only then lower the one
    shared end to the class's length."""
    start = stride * epoch
    end = start + width
    window = []
    for group in groups:
        if start >= len(group):
            continue
        end = min(end, len(group))
        window += group[start:end]
    return window


def corrected_window(groups, stride, width, epoch):
    """Each class clipped to its own length."""
    start = stride * epoch
    window = []
    for group in groups:
        window += group[start : min(start + width, len(group))]
    return window


def release_dev_batches(dev, batch_size, steps=7):
    """`steps` batches of an unshuffled loader over dev (the last one may be partial), the loader
    restarted whenever it runs out."""
    batches, loader = [], iter(())
    while len(batches) < steps:
        try:
            batches.append(next(loader))
        except StopIteration:
            loader = iter([dev[k : k + batch_size] for k in range(0, len(dev), batch_size)])
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
    make = lambda cls, semantics: cls(
        build_model("columnfc", len(sizes), 4), data, split, DefenseSettings(semantics=semantics, **settings), memscores
    )
    return make, groups


def test_shared_end_on_a_short_middle_class():
    make, groups = window_task([5, 2, 5])
    release, corrected = make(Slide, "release"), make(Slide, "corrected")
    epochs = range(6)
    assert [release.window_indices(e).tolist() for e in epochs] == [release_window(groups, 1, 3, e) for e in epochs]
    assert [corrected.window_indices(e).tolist() for e in epochs] == [corrected_window(groups, 1, 3, e) for e in epochs]
    # by hand: class 1 (2 samples) caps class 2's window until the window has passed it (epoch 2 on)
    assert [len(release.window_indices(e)) for e in epochs] == [3 + 2 + 2, 3 + 1 + 1, 3 + 3, 2 + 2, 1 + 1, 0]
    assert [len(corrected.window_indices(e)) for e in epochs] == [3 + 2 + 3, 3 + 1 + 3, 3 + 3, 2 + 2, 1 + 1, 0]
    plain = [torch.tensor(group) for group in groups]
    assert [window_at(plain, 1, 3, e, shared_end=True).tolist() for e in epochs] == [
        release_window(groups, 1, 3, e) for e in epochs
    ]
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


def test_windows_of_two_ten_ten_classes():
    """The issue's smallest case: classes of 2, 10 and 10 samples (global indices 0-1, 2-11, 12-21 in
    mem-score order), stride 3, width 5."""
    groups = [list(range(0, 2)), list(range(2, 12)), list(range(12, 22))]
    by_hand = {0: [0, 1, 2, 3, 12, 13], 1: [5, 6, 7, 8, 9, 15, 16, 17, 18, 19], 2: [8, 9, 10, 11, 18, 19, 20, 21]}
    plain = [torch.tensor(group) for group in groups]
    for epoch, expected in by_hand.items():
        assert release_window(groups, 3, 5, epoch) == expected
        assert window_at(plain, 3, 5, epoch, shared_end=True).tolist() == expected
    # class 0 runs out after epoch 0, mid-grid: every epoch of a 5-epoch grid against the reference, then past all
    assert [window_at(plain, 3, 5, e, shared_end=True).tolist() for e in range(5)] == [
        release_window(groups, 3, 5, e) for e in range(5)
    ]
    assert [len(window_at(plain, 3, 5, e, shared_end=True)) for e in range(5)] == [6, 10, 8, 2, 0]
    assert [len(window_at(plain, 3, 5, e)) for e in range(5)] == [12, 10, 8, 2, 0]  # corrected: per-class ends


@pytest.mark.parametrize("prune_epochs", [1, 3, 4, 7])
def test_rsw_release_defense_on_two_ten_ten_classes(prune_epochs):
    make, groups = window_task([2, 10, 10], stride=3, width=5, prune_epochs=prune_epochs)
    if prune_epochs == 7:  # epoch 6 starts at 18, past every class: refused under release (the release stops)
        with pytest.raises(UsageError, match="window of epoch 6 starts at 18, past every class"):
            make(Slide, "release")
        return
    release = make(Slide, "release")
    assert [release.window_indices(e).tolist() for e in range(prune_epochs)] == [
        release_window(groups, 3, 5, e) for e in range(prune_epochs)
    ]


@pytest.mark.parametrize("semantics", ["release", "corrected"])
def test_rsw_epoch_past_every_class_trains_nothing(semantics):
    make, groups = window_task([2, 5, 5])
    assert release_window(groups, 1, 3, 5) == [] == corrected_window(groups, 1, 3, 5)
    assert len(release_window(groups, 1, 3, 2)) == 6  # class 0 is passed, classes 1 and 2 keep their windows
    defense = make(Slide, semantics)
    before = {k: v.clone() for k, v in defense.model.state_dict().items()}
    loss, acc = defense.train_epoch(5)
    assert math.isnan(loss) and math.isnan(acc)
    assert all(torch.equal(before[k], v) for k, v in defense.model.state_dict().items())
    assert not math.isnan(defense.train_epoch(2)[0])


@pytest.mark.parametrize("semantics", ["release", "corrected"])
@pytest.mark.parametrize("prune_epochs", [2, 3, 5, 6])
def test_swmr_refuses_by_its_semantics_rule(semantics, prune_epochs):
    make, groups = window_task([2, 5, 5], prune_epochs=prune_epochs)
    rule = release_window if semantics == "release" else corrected_window
    refused = rule(groups, 1, 3, prune_epochs - 1) == []
    assert refused == (prune_epochs == 6)  # both rules: only once the window has passed every class
    if refused:
        with pytest.raises(
            UsageError,
            match=f"window of epoch {prune_epochs - 1} starts at {prune_epochs - 1}, past "
            f"every class \\(the largest has 5 samples\\)",
        ):
            make(SlideML2, semantics)
    else:
        make(SlideML2, semantics)


def test_swmr_release_trains_what_the_old_shared_end_refused():
    """[2, 10, 10], stride 3, width 5, 4 epochs: the end lowered by every class emptied epochs 1-3 and the
    guard refused the run; the release trains it, class 0 skipped from epoch 1 on."""
    make, groups = window_task([2, 10, 10], stride=3, width=5, prune_epochs=4)
    defense = make(SlideML2, "release")
    assert [defense.window_indices(e).tolist() for e in range(4)] == [release_window(groups, 3, 5, e) for e in range(4)]
    with pytest.raises(UsageError, match="past every class"):
        window_task([2, 10, 10], stride=3, width=5, prune_epochs=5)[0](SlideML2, "release")


# ---------------------------------------------------------------- adv


def random_task(n_train=64, n_dev=64, dim=64, num_cls=10, seed=0):
    """Random features and labels; the dev list is shuffled, so "in order" is not index order."""
    g = torch.Generator().manual_seed(seed)
    n = n_train + n_dev
    data = TensorData(torch.rand(n, dim, generator=g), torch.randint(0, num_cls, (n,), generator=g))
    dev = n_train + torch.randperm(n_dev, generator=g)
    return data, ModelSplit(torch.arange(n_train), dev, dev)


def adv_settings(semantics, **overrides):
    settings = dict(
        num_cls=10, batch_size=16, defend_arg=1.0, optimizer="adam", lr=1e-3, weight_decay=5e-4, semantics=semantics
    )
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
    monkeypatch.setattr(
        Adv, "features", lambda self, idx: features.append(idx.tolist()) or original_features(self, idx)
    )

    def recorded_pass(*args, **kwargs):
        result = original_pass(*args, **kwargs)
        passes.append((args[2].tolist(), result))
        return result

    monkeypatch.setattr(defenses, "train_pass", recorded_pass)
    return features, passes, step_counter(adv.inference_optimizer), step_counter(adv.optimizer)


@pytest.mark.parametrize(
    "n_dev, dev_order",
    [
        (32, [0, 1, 0, 1, 0, 1, 0]),
        (64, [0, 1, 2, 3, 0, 1, 2]),
        (40, [0, 1, 2, 0, 1, 2, 0]),
        (200, [0, 1, 2, 3, 4, 5, 6]),
    ],
    ids=["2 dev batches", "4 dev batches", "3 dev batches, short last", "long dev set"],
)
def test_adv_release_epoch(monkeypatch, n_dev, dev_order):
    torch.manual_seed(0)
    data, split = random_task(n_train=70, n_dev=n_dev)
    adv = Adv(ColumnFC(64, 10), data, split, adv_settings("release"))
    features, passes, inference_steps, classifier_steps = record_adv(monkeypatch, adv)
    train_list, dev = split.train.tolist(), split.dev.tolist()
    expected_others = release_dev_batches(dev, 16)
    assert expected_others == [dev[16 * k : 16 * (k + 1)] for k in dev_order]  # the reference, by hand
    member_passes = []
    for epoch in range(2):
        for log in (features, passes, inference_steps, classifier_steps):
            log.clear()
        result = adv.train_epoch(epoch)
        assert len(inference_steps) == 7 and len(classifier_steps) == 1
        members, others = features[0::2], features[1::2]
        assert others == expected_others  # in the dev list's order, restarted when it runs out, every epoch
        # members: one shuffled pass over the 70 training samples (16, 16, 16, 16, 6), then a reshuffled one
        assert [len(m) for m in members] == [16, 16, 16, 16, 6, 16, 16]
        first_pass = [i for m in members[:5] for i in m]
        assert sorted(first_pass) == sorted(train_list)
        assert len(set(members[5] + members[6])) == 32 and set(members[5] + members[6]) <= set(train_list)
        member_passes.append(first_pass)
        [(batch, pass_result)] = passes
        assert len(batch) == 16 == len(set(batch)) and set(batch) <= set(train_list)
        assert result == pass_result  # that one batch's (loss, accuracy %)
    assert member_passes[0] != member_passes[1]  # each epoch starts a fresh shuffled pass


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
    settings = dict(
        num_cls=10,
        batch_size=16,
        defend_arg=1.0,
        optimizer="adam",
        lr=0.05,
        weight_decay=1e-3,
        epochs=3,
        semantics=semantics,
    )
    settings.update(overrides)
    return DefenseSettings(**settings)


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
@pytest.mark.parametrize(
    "make_model, path", [(lambda: ColumnFC(64, 10), "vmap"), (bn_model, "loop")], ids=["vmap", "loop (BatchNorm)"]
)
def test_dp_microbatches(monkeypatch, semantics, make_model, path):
    """Every step's microbatch sizes, as the gradient generators yield them, against the rule."""
    torch.manual_seed(0)
    data, split = random_task(n_train=70)
    dp = Dp(make_model(), data, split, dp_settings(semantics, epochs=2))
    steps = []  # per step: (Poisson batch size, microbatch sizes seen)
    original = defenses.dp_gradient
    monkeypatch.setattr(
        defenses, "dp_gradient", lambda model, x, y, *rest: steps.append((len(y), [])) or original(model, x, y, *rest)
    )
    for name in ("_microbatch_grads_vmap", "_microbatch_grads_loop"):

        def recorded(model, x, y, microbatch, generator=getattr(dp_module, name), name=name):  # noqa: B008 (bound per loop turn)
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
        xb, yb = x[start : start + 3], y[start : start + 3]
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
    monkeypatch.setattr(
        defenses, "dp_gradient", lambda model, *rest: modes.append(model.training) or original(model, *rest)
    )
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

    args = prune_modi.get_args(
        [
            "-1",
            os.path.join(REPO, "config", "digits.json"),
            "--defend",
            "dp",
            "--defend_arg",
            "0.1",
            "--semantics",
            semantics,
        ]
    )
    data = TensorData(torch.rand(700, 64), torch.randint(0, 10, (700,)))
    split = ModelSplit(torch.arange(646), torch.arange(646, 700), torch.arange(646, 700))
    dp = Dp(ColumnFC(64, 10), data, split, DefenseSettings.from_args(args))
    assert dp.steps == steps == {"release": 500, "corrected": 5}[semantics]


@pytest.mark.filterwarnings("ignore:Optimal order is the smallest alpha")
@pytest.mark.parametrize("semantics", ["release", "corrected"])
def test_dp_empty_draw(monkeypatch, semantics):
    """Batch size 1 of 70 samples: about a third of the Poisson draws sample nobody. The release takes no
    step on them; corrected steps (noise only). The accountant counts every draw in both."""
    torch.manual_seed(0)
    data, split = random_task(n_train=70)
    dp = Dp(ColumnFC(64, 10), data, split, dp_settings(semantics, batch_size=1, epochs=1))
    draws, calls = [], []
    original_rand, original_gradient = torch.rand, defenses.dp_gradient
    monkeypatch.setattr(
        torch, "rand", lambda *args, **kwargs: draws.append(original_rand(*args, **kwargs)) or draws[-1]
    )
    monkeypatch.setattr(
        defenses,
        "dp_gradient",
        lambda model, x, y, *rest: calls.append(len(y)) or original_gradient(model, x, y, *rest),
    )
    steps = step_counter(dp.optimizer)
    dp.train_epoch(0)
    sampled = [int((draw < 1 / 70).sum()) for draw in draws]
    assert len(sampled) == 70 and 0 < sampled.count(0) < 70
    if semantics == "release":
        assert calls == [n for n in sampled if n] and len(steps) == 70 - sampled.count(0)
    else:
        assert calls == sampled and len(steps) == 70
    assert dp.accountant.history == [(1.0, 1 / 70, 70)]


@pytest.mark.parametrize("semantics, scale", [("release", 0.5), ("corrected", 0.64)])
def test_dp_scale_with_fewer_samples_than_a_batch(semantics, scale):
    """25 training samples, batch_size 32: every draw takes all 25 in list order; microbatches of 16. The
    release divides by its batch size (16/32), corrected by the expected batch of 25 (16/25)."""
    torch.manual_seed(0)
    data, split = random_task(n_train=25)
    model = nn.Linear(64, 10)  # no dropout: train and eval mode are the same function
    dp = Dp(model, data, split, dp_settings(semantics, batch_size=32, epochs=1, defend_arg=0.0))
    assert dp.steps == 1
    x, y = data.batch(split.train)
    clipped = []
    for xb, yb in zip(x.split(16), y.split(16)):
        model.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        g = torch.cat([p.grad.flatten() for p in model.parameters()])
        clipped.append(g * min(1.0, 1.0 / (g.norm().item() + 1e-6)))
    summed = clipped[0] if semantics == "release" else clipped[0] + clipped[1]  # release drops the 9 left over
    grads = []
    dp.optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    )
    dp.train_epoch(0)
    assert 16 / dp.divisor == scale
    assert torch.allclose(grads[0], summed * scale, atol=1e-6)


@pytest.mark.parametrize(
    "semantics, flags, used, line",
    [
        (
            "release",
            ["--prune_iter", "3", "--prune_epochs", "10"],
            (5, 21),
            "Flags forced by --defend dp under --semantics release: --prune_iter 3 -> 5, --prune_epochs 10 -> 21",
        ),
        (
            "release",
            ["--prune_epochs", "10"],
            (5, 21),
            "Flags forced by --defend dp under --semantics release: --prune_epochs 10 -> 21",
        ),
        ("release", [], (5, 21), None),
        ("corrected", ["--prune_iter", "3", "--prune_epochs", "10"], (3, 10), None),
    ],
)
def test_dp_release_forces_the_release_pruning_flags(semantics, flags, used, line):
    import prune_modi

    digits = os.path.join(REPO, "config", "digits.json")
    args = prune_modi.get_args(
        ["-1", digits, "--defend", "dp", "--defend_arg", "0.1", "--semantics", semantics, *flags]
    )
    assert (args.prune_iter, args.prune_epochs) == used
    assert prune_modi.forced_line(args, Dp) == line
    assert DefenseSettings.from_args(args).prune_epochs == used[1]
    other = prune_modi.get_args(["-1", digits, "--defend", "ppb", "--prune_iter", "3", "--prune_epochs", "10"])
    assert (other.prune_iter, other.prune_epochs, prune_modi.forced_line(other, defenses.Ppb)) == (3, 10, None)

"""The baseline defenses (ppb, relaxloss, adv, dp): losses against hand computations, the ADV game,
DP-SGD's clipping, noise and accounting, and each one end to end on digits."""

import os
import re
import subprocess

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from opacus.accountants import RDPAccountant

import defenses
import prune_modi
from common import UsageError
from conftest import REPO
from datasets import TensorData
from defenses import Adv, DefenseSettings, Dp, adv_classifier_loss, inference_features, ppb_kl, ppb_loss, relaxloss_loss
from dp import clipped_gradient_sum, dp_gradient
from helpers import bn_model, run_scripts
from helpers import one_thread as torch_on_one_thread
from models import ColumnFC
from splits import ModelSplit

LOGITS = torch.tensor(
    [[2.0, -1.0, 0.5, 0.0], [0.1, 0.3, -0.2, 1.5], [-1.0, 3.0, 0.0, 0.2], [0.0, 0.0, 1.0, -2.0], [5.0, 1.0, -3.0, 0.4]]
)
LABELS = torch.tensor([0, 3, 2, 2, 1])


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: extra threads only fight over the shared cores."""
    with torch_on_one_thread():
        yield


def softmax_rows(rows):
    e = np.exp(rows - rows.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def args_for(**overrides):
    settings = dict(
        num_cls=10, batch_size=16, defend_arg=1.0, optimizer="adam", lr=1e-3, weight_decay=5e-4, dp_microbatch=None
    )
    settings.update(overrides)
    return DefenseSettings(**settings)


def random_task(n_train=64, n_dev=64, dim=64, num_cls=10, seed=0):
    """Random features with random labels: a model can only memorise its training rows."""
    g = torch.Generator().manual_seed(seed)
    n = n_train + n_dev
    data = TensorData(torch.rand(n, dim, generator=g), torch.randint(0, num_cls, (n,), generator=g))
    split = ModelSplit(torch.arange(n_train), torch.arange(n_train, n), torch.arange(n_train, n))
    return data, split


# ---------------------------------------------------------------- ppb


def test_ppb_kl_matches_manual_and_drops_the_odd_row():
    ranked = -np.sort(-LOGITS.numpy(), axis=1)
    first, second = softmax_rows(ranked[:2]), softmax_rows(ranked[2:4])
    manual = float((second * (np.log(second) - np.log(first))).sum() / 2)
    assert ppb_kl(LOGITS).item() == pytest.approx(manual, rel=1e-5)
    changed = LOGITS.clone()
    changed[4] = torch.tensor([-9.0, 4.0, 7.0, 1.0])
    assert ppb_kl(changed).item() == pytest.approx(manual, rel=1e-5)
    ce = F.cross_entropy(LOGITS, LABELS).item()
    assert ppb_loss(LOGITS, LABELS, 4.0).item() == pytest.approx(ce + 4 * manual, rel=1e-5)
    assert ppb_kl(LOGITS[:1]).item() == 0.0


# ---------------------------------------------------------------- relaxloss


def manual_relaxloss(logits, y, alpha, epoch):
    probs = softmax_rows(logits.numpy().astype(np.float64))
    labels = y.numpy()
    ce = -np.log(probs[np.arange(len(labels)), labels])
    if epoch % 2 == 0:
        return abs(ce.mean() - alpha)
    if ce.mean() > alpha:
        return ce.mean()
    total = 0.0
    num_cls = probs.shape[1]
    for row, label, row_ce in zip(probs, labels, ce):
        p_true = min(max(row[label], 0.0), 1.0)
        soft = np.full(num_cls, (1 - p_true) / (num_cls - 1))
        soft[label] = p_true
        soft_ce = -(soft * np.log(row)).sum()
        wrong = float(row.argmax() != label)
        total += wrong * soft_ce - row_ce
    return total / len(labels)


@pytest.mark.parametrize(
    "alpha, epoch, case", [(2.5, 4, "even"), (0.2, 3, "odd, CE above alpha"), (3.0, 1, "odd, flattening")]
)
def test_relaxloss_matches_manual(alpha, epoch, case):
    mean_ce = F.cross_entropy(LOGITS, LABELS).item()  # 1.724: below alpha in the even case (gradient ascent)
    if case != "even":
        assert (mean_ce > alpha) == (case == "odd, CE above alpha")
    assert (LOGITS.argmax(1) != LABELS).any() and (LOGITS.argmax(1) == LABELS).any()
    got = relaxloss_loss(LOGITS, LABELS, alpha, epoch).item()
    assert got == pytest.approx(manual_relaxloss(LOGITS, LABELS, alpha, epoch), rel=1e-5)
    if case == "odd, flattening":  # not plain CE, not the even-epoch rule
        assert got != pytest.approx(mean_ce) and got != pytest.approx(abs(mean_ce - alpha))


# ---------------------------------------------------------------- adv


def inference_accuracy(adv, split):
    adv.inference.eval()
    with torch.no_grad():
        members = adv.inference(adv.features(split.train)).argmax(1) == 1
        others = adv.inference(adv.features(split.dev)).argmax(1) == 0
    return 0.5 * (members.float().mean().item() + others.float().mean().item())


def overfitted_model(data, split, steps=300):
    torch.manual_seed(0)
    model = ColumnFC(64, 10)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x, y = data.batch(split.train)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model


@pytest.mark.slow
def test_adv_inference_model_learns_to_spot_members_of_an_overfitted_model():
    data, split = random_task()
    model = overfitted_model(data, split)
    adv = Adv(model, data, split, args_for(batch_size=32))
    before = inference_accuracy(adv, split)
    for _ in range(150):
        adv.inference_step()
    after = inference_accuracy(adv, split)
    assert after >= 0.85 and after > before + 0.2, (before, after)


def test_adv_classifier_loss_subtracts_theta_times_the_inference_loss():
    data, split = random_task()
    model = overfitted_model(data, split, steps=50)
    adv = Adv(model, data, split, args_for(batch_size=32))
    x, y = data.batch(split.train[:8])
    logits = model(x)
    adv.inference.eval()
    inference_ce = F.cross_entropy(
        adv.inference(torch.cat([F.softmax(logits, 1), F.one_hot(y, 10).float()], 1)), torch.ones(8, dtype=torch.long)
    )
    ce = F.cross_entropy(logits, y)
    assert inference_ce.item() > 1e-3
    got = adv_classifier_loss(logits, y, adv.inference, 2.5)
    assert got.item() == pytest.approx((ce - 2.5 * inference_ce).item(), rel=1e-5)


def member_probability_after_one_step(theta):
    data, split = random_task()
    model = overfitted_model(data, split, steps=50).eval()  # eval: no dropout, so both runs match
    adv = Adv(model, data, split, args_for(batch_size=32))
    for _ in range(30):
        adv.inference_step()
    model.eval()
    x, y = data.batch(split.train)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    opt.zero_grad()
    adv_classifier_loss(model(x), y, adv.inference, theta).backward()
    opt.step()
    with torch.no_grad():
        return F.softmax(adv.inference(inference_features(model(x), y)), 1)[:, 1].mean().item()


def test_adv_classifier_step_pushes_the_inference_model_to_fail():
    torch.manual_seed(1)
    plain = member_probability_after_one_step(0.0)
    torch.manual_seed(1)
    defended = member_probability_after_one_step(5.0)
    assert defended < plain - 0.01, (plain, defended)


def test_adv_runs_k_inference_steps_per_classifier_step(monkeypatch):
    data, split = random_task(n_train=64)
    adv = Adv(ColumnFC(64, 10), data, split, args_for(batch_size=16))
    calls = []
    original = Adv.inference_step
    monkeypatch.setattr(Adv, "inference_step", lambda self: calls.append(1) or original(self))
    before = [p.detach().clone() for p in adv.inference.parameters()]
    adv.train_epoch(0)
    assert len(calls) == 4 * Adv.inference_steps == 28
    assert any(not torch.equal(a, b) for a, b in zip(before, adv.inference.parameters()))


# ---------------------------------------------------------------- dp


def clipped_mean_reference(model, x, y, microbatch, clip=1.0):
    """Plain autograd, one microbatch at a time: mean of gradients clipped to norm <= clip."""
    clipped, norms = [], []
    for xb, yb in zip(x.split(microbatch), y.split(microbatch)):
        model.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        g = torch.cat([p.grad.flatten() for p in model.parameters()])
        norms.append(g.norm().item())
        clipped.append(g * min(1.0, clip / g.norm().item()))
    return torch.stack(clipped).mean(0), norms


@pytest.mark.parametrize("make_model", [lambda: ColumnFC(64, 10), bn_model], ids=["vmap", "loop (BatchNorm)"])
def test_dp_without_noise_is_the_mean_of_clipped_microbatch_gradients(make_model):
    torch.manual_seed(0)
    model = make_model().eval()  # eval: the reference and the tested path see the same function
    x, y = torch.rand(12, 64) * 3, torch.randint(0, 10, (12,))
    reference, norms = clipped_mean_reference(model, x, y, microbatch=3)
    assert max(norms) > 1.0 and len(norms) == 4
    dp_gradient(model, x, y, microbatch=3, expected_batch=12, clip=1.0, sigma=0.0)
    got = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert torch.allclose(got, reference, atol=1e-6)


def test_dp_gradient_handles_a_ragged_last_microbatch_and_an_empty_batch():
    torch.manual_seed(0)
    model = ColumnFC(64, 10).eval()
    x, y = torch.rand(7, 64) * 3, torch.randint(0, 10, (7,))
    reference, _ = clipped_mean_reference(model, x, y, microbatch=3)  # microbatches of 3, 3, 1
    dp_gradient(model, x, y, microbatch=3, expected_batch=9, clip=1.0, sigma=0.0)
    got = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert torch.allclose(got, reference * 3 * 3 / 9, atol=1e-6)  # sum of 3 clipped, times 3/9
    total, loss_sum, correct = clipped_gradient_sum(model, x[:0], y[:0], 3, 1.0)
    assert all(torch.count_nonzero(t) == 0 for t in total.values()) and loss_sum.item() == 0


@pytest.mark.parametrize("microbatch", [1, 4])
def test_dp_noise_std_is_clip_sigma_over_expected_microbatches(microbatch):
    torch.manual_seed(0)
    model = ColumnFC(64, 10).eval()
    x, y = torch.rand(16, 64), torch.randint(0, 10, (16,))
    dp_gradient(model, x, y, microbatch, expected_batch=16, clip=1.0, sigma=0.0)
    clean = torch.cat([p.grad.flatten() for p in model.parameters()])
    dp_gradient(model, x, y, microbatch, expected_batch=16, clip=1.0, sigma=2.0)
    noisy = torch.cat([p.grad.flatten() for p in model.parameters()])
    expected = 1.0 * 2.0 * microbatch / 16
    assert (noisy - clean).std().item() == pytest.approx(expected, rel=0.03)
    assert abs((noisy - clean).mean().item()) < expected * 0.03


def dp_defense(sigma, model=None, n_train=64, batch_size=16, microbatch=None):
    data, split = random_task(n_train=n_train)
    model = model if model is not None else ColumnFC(64, 10)
    return Dp(model, data, split, args_for(batch_size=batch_size, defend_arg=sigma, dp_microbatch=microbatch))


@pytest.mark.slow
def test_dp_epsilon_drops_with_sigma_and_rises_with_steps():
    torch.manual_seed(0)
    eps = {}
    for sigma in (0.5, 1.0, 2.0):
        dp = dp_defense(sigma)
        dp.train_epoch(0)
        assert len(dp.accountant.history) == 1 and dp.accountant.history[0][2] == 64 // 16
        eps[sigma, 1] = dp.epsilon()
        dp.train_epoch(1)
        eps[sigma, 2] = dp.epsilon()
    assert eps[0.5, 1] > eps[1.0, 1] > eps[2.0, 1] > 0
    assert all(eps[s, 2] > eps[s, 1] for s in (0.5, 1.0, 2.0))
    reference = RDPAccountant()
    for _ in range(8):
        reference.step(noise_multiplier=1.0, sample_rate=16 / 64)
    assert eps[1.0, 2] == pytest.approx(reference.get_epsilon(delta=1e-5))
    assert re.fullmatch(r"DP epsilon: \d+\.\d{3} \(delta 1e-5\)", dp.iteration_summary())
    no_noise = dp_defense(0.0)
    no_noise.train_epoch(0)
    assert no_noise.iteration_summary() == "DP epsilon: inf (delta 1e-5)"


def test_dp_default_microbatch_and_poisson_batches(monkeypatch):
    dp = dp_defense(1.0, n_train=640, batch_size=64)
    assert dp.microbatch == 32 and dp.sample_rate == pytest.approx(0.1)
    sizes = []
    original = defenses.dp_gradient
    monkeypatch.setattr(
        defenses, "dp_gradient", lambda model, x, y, *rest: sizes.append(len(y)) or original(model, x, y, *rest)
    )
    torch.manual_seed(0)
    for epoch in range(5):
        dp.train_epoch(epoch)
    assert len(sizes) == 5 * 10
    assert len(set(sizes)) > 3 and abs(np.mean(sizes) - 64) < 6  # Binomial(640, 0.1) batch sizes


def test_dp_trains_a_batchnorm_model_with_microbatches():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(10, 64, generator=g) * 2
    y = torch.randint(0, 10, (256,), generator=g)
    data = TensorData(centers[y] + 0.3 * torch.randn(256, 64, generator=g), y)
    split = ModelSplit(torch.arange(192), torch.arange(192, 256), torch.arange(192, 256))
    model = bn_model()
    dp = Dp(model, data, split, args_for(batch_size=32, defend_arg=0.1, dp_microbatch=4, lr=3e-2))
    running_mean = model[2].running_mean.clone()
    losses = [dp.train_epoch(epoch)[0] for epoch in range(8)]
    assert losses[-1] < 0.5 * losses[0], losses
    assert not torch.equal(running_mean, model[2].running_mean)


# ---------------------------------------------------------------- flags

DIGITS = os.path.join(REPO, "config", "digits.json")


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--defend", "ppb", "--defend_arg", "-1"], "--defend ppb needs --defend_arg >= 0"),
        (["--defend", "adv", "--defend_arg", "0"], "--defend adv needs --defend_arg > 0"),
        (["--defend", "relaxloss", "--defend_arg", "0"], "--defend relaxloss needs --defend_arg > 0"),
        (["--defend", "dp", "--defend_arg", "-0.1"], "--defend dp needs --defend_arg >= 0"),
        (["--defend", "dp", "--defend_arg", "nan"], "--defend_arg must be a finite number, got nan"),
        (["--defend", "dp", "--defend_arg", "1", "--dp_microbatch", "0"], "--dp_microbatch must be in 1..--batch_size"),
        (
            ["--defend", "dp", "--defend_arg", "1", "--dp_microbatch", "200"],
            "--dp_microbatch must be in 1..--batch_size",
        ),
    ],
)
def test_bad_defend_args_are_one_line_usage_errors(flags, needle):
    with pytest.raises(UsageError) as err:
        prune_modi.get_args(["-1", DIGITS, *flags])
    assert needle in str(err.value) and "\n" not in str(err.value)


# ---------------------------------------------------------------- end to end on digits

BASELINE_RUNS = [("ppb", "4"), ("adv", "2"), ("relaxloss", "1"), ("dp", "0.1")]


@pytest.fixture(scope="module")
def digits_runs(tmp_path_factory):
    """Pretrain (2 epochs, 1 shadow), then prune + adaptively attack under each baseline (one process)."""
    folder = tmp_path_factory.mktemp("digits_baselines")
    runs = [["pretrain_modi.py", "-1", DIGITS, "--epochs", "2", "--shadow_num", "1"]]
    for defend, arg in BASELINE_RUNS:
        common = [
            "-1",
            DIGITS,
            "--pruner_name",
            "iter_prunetxt",
            "--prune_sparsity",
            "0.6",
            "--defend",
            defend,
            "--defend_arg",
            arg,
            "--shadow_num",
            "1",
        ]
        # dp under release runs 5 iterations of 21 epochs whatever the flags say (and logs that it overrides
        # them): one config epoch and no early stop keep it at 21 x len(train)//128 steps per iteration
        quick = ["--epochs", "1", "--early_stop", "0"] if defend == "dp" else []
        runs.append(["prune_modi.py", *common, "--prune_iter", "2", "--prune_epochs", "2", *quick])
        runs.append(["mia_modi.py", *common, "--attacks", "threshold", "--adaptive"])
    run_scripts(*runs, cwd=folder, timeout=600)
    return folder


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Optimal order is the smallest alpha")
@pytest.mark.parametrize("defend, arg", BASELINE_RUNS)
def test_baseline_end_to_end_on_digits(digits_runs, defend, arg):
    stem = f"iter_prunetxt_0.6_{defend}_{float(arg)}"
    result = digits_runs / "result" / "digits_columnfc"
    for folder in (f"{stem}_model", f"shadow_{stem}_model_0"):
        assert (result / folder / "best.pth").is_file() and (result / folder / "best_mask.pth").is_file()
    lines = (digits_runs / "log" / "digits_columnfc" / f"iter_prunetxt_0.6_{defend}.txt").read_text().splitlines()
    assert lines[0] == f"digits_columnfc_{stem}_0.0005"
    number = r"\d+\.\d{3}"
    iterations = 5 if defend == "dp" else 2
    iteration = rf"iter \d best model: Accuracy {number}, Loss {number}"
    assert sum(bool(re.fullmatch(rf"victim {iteration}", line)) for line in lines) == iterations
    assert sum(bool(re.fullmatch(rf"shadow 0 {iteration}", line)) for line in lines) == iterations
    forced = [line for line in lines if line.startswith("Flags forced")]
    assert forced == (
        ["Flags forced by --defend dp under --semantics release: --prune_iter 2 -> 5, --prune_epochs 2 -> 21"]
        if defend == "dp"
        else []
    )
    if defend == "dp":
        assert lines[lines.index(forced[0]) - 1] == "Semantics: release"
    assert any(re.fullmatch(rf"Total {defend} defend time: {number}s", line) for line in lines)
    assert f"Shadows: {stem} (adaptive)" in lines
    assert any(re.fullmatch(rf"Victim pruned model test accuracy: {number}", line) for line in lines)
    for name in ("Conf", "Entr", "Mentr", "Hconf"):
        assert any(re.fullmatch(rf"{name} attack accuracy: {number}", line) for line in lines)

    epsilons = [float(m.group(1)) for line in lines if (m := re.fullmatch(r"DP epsilon: (\S+) \(delta 1e-5\)", line))]
    if defend != "dp":
        assert epsilons == []
        return
    # one line right after each iteration: victim iter 0-4, then shadow 0 iter 0-4 (21 epochs each, forced)
    after = [lines[i - 1] for i, line in enumerate(lines) if line.startswith("DP epsilon")]
    assert [line.split(" best")[0] for line in after] == [
        f"{who} iter {i}" for who in ("victim", "shadow 0") for i in range(5)
    ]
    with np.load(result / "split.npz") as split:
        sizes = len(split["victim_train"]), len(split["shadow_train_0"])
    expected = []
    for n in sizes:  # --semantics release: len(train)//batch_size * --epochs 1 draws per epoch, 21 epochs
        accountant = RDPAccountant()
        for _ in range(5):
            for _ in range(21 * (n // 128) * 1):
                accountant.step(noise_multiplier=0.1, sample_rate=128 / n)
            expected.append(round(accountant.get_epsilon(delta=1e-5), 3))
    assert epsilons == pytest.approx(expected, abs=1e-3)
    assert epsilons[1] > epsilons[0]


# ---------------------------------------------------------------- run_custom.sh


def run_custom(tmp_path, *argv, python_status=0):
    """Run a copy of run_custom.sh in tmp_path with a fake `python` that only records its arguments."""
    (tmp_path / "run_custom.sh").write_text(open(os.path.join(REPO, "run_custom.sh")).read())
    shim = tmp_path / "bin" / "python"
    shim.parent.mkdir(exist_ok=True)
    shim.write_text(f'#!/bin/sh\necho "$*" >> "$(dirname "$0")/calls.txt"\nexit {python_status}\n')
    shim.chmod(0o755)
    env = dict(os.environ, PATH=f"{shim.parent}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.run(["bash", str(tmp_path / "run_custom.sh"), *argv], env=env, capture_output=True, text=True)
    calls = tmp_path / "bin" / "calls.txt"
    return proc, calls.read_text().splitlines() if calls.exists() else []


def expected_calls(config, pruner, gpu):
    calls = []
    for defend, arg in [("ppb", "4"), ("adv", "2"), ("relaxloss", "1"), ("dp", "0.1")]:
        calls.append(
            f"prune_modi.py {gpu} {config} --pruner_name {pruner} --prune_sparsity 0.6 --prune_iter 5 "
            f"--defend {defend} --defend_arg {arg}"
        )
        calls.append(
            f"mia_modi.py {gpu} {config} --pruner_name {pruner} --prune_sparsity 0.6 "
            f"--attacks threshold,samia --defend {defend} --defend_arg {arg} --adaptive"
        )
    return calls


def test_run_custom_release_sequence(tmp_path):
    proc, calls = run_custom(tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert calls == (
        expected_calls("./config/cifar10_resnet18.json", "iter_pruning", 0)
        + expected_calls("./config/location.json", "iter_prunetxt", 0)
    )


def test_run_custom_digits_pretrains_only_when_the_victim_is_missing(tmp_path):
    proc, calls = run_custom(tmp_path, "digits")
    assert proc.returncode == 0, proc.stderr
    assert calls == ["pretrain_modi.py -1 ./config/digits.json"] + expected_calls(
        "./config/digits.json", "iter_prunetxt", -1
    )
    (tmp_path / "bin" / "calls.txt").unlink()
    victim = tmp_path / "result" / "digits_columnfc" / "victim_model" / "complete.json"  # a finished victim
    victim.parent.mkdir(parents=True)
    victim.write_bytes(b"")
    proc, calls = run_custom(tmp_path, "digits", "1")
    assert proc.returncode == 0 and calls == expected_calls("./config/digits.json", "iter_prunetxt", 1)
    (tmp_path / "bin" / "calls.txt").unlink()
    proc, calls = run_custom(tmp_path, "digits", "-1", "--semantics", "corrected")  # flags reach every step
    assert proc.returncode == 0
    assert calls == [
        f"{call} --semantics corrected" for call in expected_calls("./config/digits.json", "iter_prunetxt", -1)
    ]


@pytest.mark.parametrize("argv", [["cifar"], ["", "0"]])
def test_run_custom_rejects_unknown_arguments(tmp_path, argv):
    proc, calls = run_custom(tmp_path, *argv)
    assert proc.returncode == 2 and proc.stderr.startswith("usage: bash run_custom.sh") and calls == []


def test_run_custom_stops_at_the_first_failing_step(tmp_path):
    proc, calls = run_custom(tmp_path, python_status=3)
    assert proc.returncode == 3 and len(calls) == 1

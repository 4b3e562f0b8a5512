"""splits.py: the release's victim/shadow split (docs/pipeline.md#the-split), its persistence and reuse checks."""

import numpy as np
import pytest
from sklearn.model_selection import train_test_split

from common import MissingError, UsageError
from splits import Split, make_split

N_TRAIN, N_TEST = 1437, 360  # digits under an 80/20 split; any sizes do


def reference_split(n_train, n_test, seed, shadow_num):
    """The release's split, written out call by call; pools hold trainset indices and then the test set
    shifted by n_train (one shared index space)."""
    out = {}
    victim_list, shadow_list = train_test_split(range(n_train), test_size=0.5, random_state=seed)
    victim_train, held = train_test_split(victim_list, test_size=0.1, random_state=seed)
    pool_v = list(held) + [n_train + j for j in range(n_test)]
    victim_dev, victim_test = train_test_split(range(len(pool_v)), test_size=0.66, random_state=seed)
    out["victim_train"] = list(victim_train)
    out["victim_dev"] = [pool_v[i] for i in victim_dev]
    out["victim_test"] = [pool_v[i] for i in victim_test]
    out["victim_held"] = list(held)
    for i in range(shadow_num):
        shadow_train, held_i = train_test_split(shadow_list, test_size=0.1, random_state=seed + i)
        pool_i = list(held_i) + [n_train + j for j in range(n_test)]
        shadow_dev, shadow_test = train_test_split(range(len(pool_i)), test_size=0.66, random_state=seed + i)
        out[f"shadow_train_{i}"] = list(shadow_train)
        out[f"shadow_dev_{i}"] = [pool_i[k] for k in shadow_dev]
        out[f"shadow_test_{i}"] = [pool_i[k] for k in shadow_test]
        out[f"shadow_held_{i}"] = list(held_i)
    return out


def roles(shadow_num):
    return [("victim_train", "victim_dev", "victim_test", "victim_held")] + [
        (f"shadow_train_{i}", f"shadow_dev_{i}", f"shadow_test_{i}", f"shadow_held_{i}") for i in range(shadow_num)
    ]


@pytest.mark.parametrize(
    "n_train,n_test,seed,shadow_num", [(N_TRAIN, N_TEST, 7, 3), (1000, 250, 0, 2), (501, 77, 123, 5)]
)
def test_indices_equal_sklearn_recomputation(n_train, n_test, seed, shadow_num):
    got = make_split(n_train, n_test, seed, shadow_num)
    want = reference_split(n_train, n_test, seed, shadow_num)
    assert set(got) == {k for k in want if "held" not in k}
    for key, array in got.items():
        assert array.dtype == np.int64
        assert array.tolist() == want[key], key


def test_members_and_nonmembers_never_overlap():
    split = make_split(N_TRAIN, N_TEST, 7, 4)
    want = reference_split(N_TRAIN, N_TEST, 7, 4)
    for train, dev, test, held in roles(4):
        members, dev_set, nonmembers = set(split[train]), set(split[dev]), set(split[test])
        assert len(members) == len(split[train]) and len(nonmembers) == len(split[test])
        assert not members & nonmembers
        assert not members & dev_set and not dev_set & nonmembers
        # dev/test pool = the held-out training rows + the whole test set in the shared index space
        assert dev_set | nonmembers == set(want[held]) | set(range(N_TRAIN, N_TRAIN + N_TEST))
        assert len(split[dev]) + len(split[test]) == len(want[held]) + N_TEST
        assert max(members) < N_TRAIN
    victim_members = set(split["victim_train"])
    for i in range(4):  # victim and shadows train on disjoint halves of the training set
        assert not victim_members & set(split[f"shadow_train_{i}"])
    assert split["shadow_train_0"].tolist() != split["shadow_train_1"].tolist()


def test_model_view_and_shadow_bounds():
    split = Split.create("digits", N_TRAIN, N_TEST, 7, 2)
    victim, shadow1 = split.indices(), split.indices(1)
    assert victim.train.tolist() == split.arrays["victim_train"].tolist()
    assert victim.test.tolist() == split.arrays["victim_test"].tolist()
    assert shadow1.dev.tolist() == split.arrays["shadow_dev_1"].tolist()
    with pytest.raises(UsageError, match="2 shadows"):
        split.indices(2)


def test_save_load_round_trip_is_exact(tmp_path):
    split = Split.create("digits", N_TRAIN, N_TEST, 11, 3)
    path = tmp_path / "result" / "split.npz"
    split.save(str(path))
    loaded = Split.load(str(path))
    assert loaded.meta == {"dataset": "digits", "n_train": N_TRAIN, "n_test": N_TEST, "seed": 11, "shadow_num": 3}
    assert set(loaded.arrays) == set(split.arrays)
    for key in split.arrays:
        assert loaded.arrays[key].dtype == np.int64
        assert np.array_equal(loaded.arrays[key], split.arrays[key])
    for who in (None, 0, 2):
        a, b = split.indices(who), loaded.indices(who)
        assert all(x.tolist() == y.tolist() for x, y in zip((a.train, a.dev, a.test), (b.train, b.dev, b.test)))
    assert not list(path.parent.glob(".tmp_*"))  # atomic write leaves no temp file


def test_load_missing_or_corrupt_is_one_line_error(tmp_path):
    with pytest.raises(MissingError, match="not found; run pretrain_modi.py") as missing:
        Split.load(str(tmp_path / "nope.npz"))
    bad = tmp_path / "split.npz"
    bad.write_bytes(b"not a zip file")
    with pytest.raises(MissingError, match="--force") as corrupt:
        Split.load(str(bad))
    assert "\n" not in str(missing.value) and "\n" not in str(corrupt.value)


def test_mismatch_reasons():
    split = Split.create("digits", N_TRAIN, N_TEST, 7, 3)
    assert split.mismatch("digits", N_TRAIN, N_TEST, 7, 3) is None
    assert split.mismatch("digits", N_TRAIN, N_TEST, 7, 2) is None  # fewer shadows: a prefix of ours
    assert split.mismatch("digits", N_TRAIN, N_TEST) is None  # seed=None: any seed
    assert split.mismatch("location", N_TRAIN, N_TEST) == (
        "it was made with dataset=digits, this run has dataset=location"
    )
    assert split.mismatch("digits", 1400, N_TEST) == f"it was made with n_train={N_TRAIN}, this run has n_train=1400"
    assert split.mismatch("digits", N_TRAIN, 10) == f"it was made with n_test={N_TEST}, this run has n_test=10"
    assert split.mismatch("digits", N_TRAIN, N_TEST, 8, 3) == "it was made with seed=7, this run has seed=8"
    assert split.mismatch("digits", N_TRAIN, N_TEST, 7, 4) == "it has 3 shadows, this run asks for 4"


def test_fewer_shadows_are_a_prefix_of_more():
    """Why reusing a split with more shadows is sound: shadow i depends only on seed + i."""
    small, large = make_split(N_TRAIN, N_TEST, 7, 2), make_split(N_TRAIN, N_TEST, 7, 5)
    for key, array in small.items():
        assert np.array_equal(array, large[key])


def damaged(tmp_path, change):
    """Save a valid split, change its arrays with change(arrays), and write it back as pretraining would."""
    split = Split.create("digits", N_TRAIN, N_TEST, 7, 2)
    change(split.arrays)
    path = str(tmp_path / "split.npz")
    split.save(path)
    return path


@pytest.mark.parametrize(
    "change, why",
    [
        (
            lambda a: a.update(victim_test=np.concatenate([a["victim_test"], a["victim_train"][:1]])),
            "victim_train and victim_test overlap",
        ),
        (
            lambda a: a.update(shadow_test_1=np.concatenate([a["shadow_test_1"], a["victim_train"][:3]])),
            "members of victim_train are non-members in shadow_test_1",
        ),
        (
            lambda a: a.update(shadow_train_0=np.concatenate([a["shadow_train_0"], a["victim_test"][:1]])),
            "shadow_train_0 and shadow_test_0 overlap",
        ),
        (lambda a: a.update(victim_dev=np.append(a["victim_dev"][1:], -1)), "victim_dev holds indices outside 0..1796"),
        (lambda a: a.update(victim_dev=np.append(a["victim_dev"][1:], N_TRAIN + N_TEST)), "outside 0..1796"),
        (
            lambda a: a.update(victim_train=a["victim_train"].astype(np.float64)),
            "victim_train is not a 1-D integer array",
        ),
        (lambda a: a.update(shadow_dev_1=np.array([], dtype=np.int64)), "shadow_dev_1 is empty"),
        (lambda a: a.update(victim_train=np.append(a["victim_train"], a["victim_train"][0])), "victim_train repeats"),
    ],
)
def test_a_damaged_split_is_refused_on_load(tmp_path, change, why):
    path = damaged(tmp_path, change)
    with pytest.raises(MissingError, match="damaged") as err:
        Split.load(path)
    assert why in str(err.value) and "rerun pretrain_modi.py with --force" in str(err.value)

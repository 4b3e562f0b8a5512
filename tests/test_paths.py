"""Where the scripts look (paths.py): data/datasets/ and memscore/ are the repo's, whatever the working
directory; result/ and log/ are the working directory's, as in the paper's release."""

import os
import shutil

import pytest

import paths
from conftest import REPO, copy_repo, run_script
from helpers import pretrain_cmd, prune_cmd

SLIDE_RE = ["--prune_sparsity", "0.6", "--defend", "slide_re", "--stride", "2", "--width", "10", "--quiet"]
MEMSCORE = os.path.join("memscore", "memscore_digits_columnfc.csv")


def test_repo_folders_are_absolute_and_run_folders_relative():
    assert paths.DATA_ROOT == os.path.join(REPO, "data", "datasets")
    assert paths.MEMSCORE_ROOT == os.path.join(REPO, "memscore")
    assert paths.memscore_path("digits", "columnfc") == os.path.join(REPO, MEMSCORE)
    assert (paths.RESULT_ROOT, paths.LOG_ROOT) == ("result", "log")


@pytest.mark.slow
def test_scripts_run_from_another_folder_find_the_repos_memscores(tmp_path):
    """`cd elsewhere && python <repo>/prune_modi.py ... --defend slide_re` uses the shipped digits mem-scores
    and the repo's data folder, and writes result/ and log/ where it runs."""
    repo, work = copy_repo(tmp_path / "repo"), tmp_path / "work"  # repo: a copy with the shipped mem-scores
    work.mkdir()
    config = os.path.join(repo, "config", "digits.json")
    prune = prune_cmd(1, 1, *SLIDE_RE, "--no_tensorboard", config=config)
    run_script(*pretrain_cmd(1, 1, "--quiet", config=config), cwd=work, repo=repo)
    proc = run_script(*prune, cwd=work, repo=repo, check=False)
    assert proc.returncode == 0, proc.stderr  # a slide_re run reads the mem-scores before its first log line
    assert sorted(os.listdir(work)) == ["log", "result"]
    assert os.path.isfile(work / "log" / "digits_columnfc" / "iter_prunetxt_0.6_slide_re.txt")
    assert os.path.isfile(work / "result" / "digits_columnfc" / "iter_prunetxt_0.6_slide_re_model" / "best.pth")
    assert os.path.isfile(os.path.join(repo, "data", "datasets", "digits", "digits_split.npz"))  # the data's cache
    assert not {"result", "log"} & set(os.listdir(repo))

    # the same command from a repo without mem-scores names that repo's file, not the working directory's
    bare = copy_repo(tmp_path / "bare", memscores=False)
    (work / "memscore").mkdir()  # a memscore/ in the working directory is not looked at
    shutil.copy(os.path.join(repo, MEMSCORE), work / MEMSCORE)
    proc = run_script(*prune, cwd=work, repo=bare, check=False)
    assert proc.returncode == 1
    assert proc.stderr.startswith(
        f"error: mem-scores {os.path.join(bare, MEMSCORE)} not found; compute it with "
        f"python compute_memscore.py -1 {config}"
    ), proc.stderr
    assert len(proc.stderr.splitlines()) == 1

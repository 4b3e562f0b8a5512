"""The single-node Slurm of slurm/local_cluster.sh, tested for real (no mocks).

Uses a running cluster when SLURM_CONF is set and `sinfo` answers; else starts one with the script
in a fresh folder (free ports, so it can't clash with another one) and stops it at the end. A
machine that can't run Slurm (not root, apt or the daemons fail) fails these tests, unless
WEMEM_ALLOW_NO_SLURM=1 is set: then they are skipped with a loud message.
"""

import contextlib
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time

import pytest

pytestmark = pytest.mark.slow  # runs the scripts end to end

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "slurm", "local_cluster.sh")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _no_slurm(message):
    if os.environ.get("WEMEM_ALLOW_NO_SLURM") == "1":
        pytest.skip(f"!!! NO SLURM: Slurm tests NOT RUN (WEMEM_ALLOW_NO_SLURM=1): {message}")
    pytest.fail(f"cannot run Slurm here: {message}\n(set WEMEM_ALLOW_NO_SLURM=1 to skip these tests)")


def _sinfo_answers(env):
    # `scontrol ping` first: it fails at once when slurmctld is down, sinfo only after 9 s of retries.
    try:
        return all(
            subprocess.run(cmd, env=env, capture_output=True, timeout=20).returncode == 0
            for cmd in (["scontrol", "ping"], ["sinfo", "-h"])
        )
    except (OSError, subprocess.TimeoutExpired):
        return False


class Cluster:
    def __init__(self, conf, state_dir, started_here):
        self.conf, self.state_dir, self.started_here = conf, state_dir, started_here
        self.env = dict(os.environ, SLURM_CONF=conf)
        self.env.pop("CUDA_VISIBLE_DEVICES", None)  # sbatch exports the environment to jobs

    def run(self, *cmd, check=True, timeout=30):
        proc = subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            pytest.fail(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
        return proc

    def script(self, action, timeout=120):
        return self.run("bash", SCRIPT, action, self.state_dir, check=False, timeout=timeout)

    def sbatch(self, *args):
        return self.run("sbatch", "--parsable", *args).stdout.strip().split(";")[0]

    def job(self, job_id):
        """scontrol's fields of a job (jobs stay known 300 s after they end: MinJobAge)."""
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait_state(self, job_id, pred, timeout=30):
        deadline = time.time() + timeout
        while True:
            info = self.job(job_id)
            if pred(info):
                return info
            if time.time() > deadline:
                pytest.fail(f"job {job_id} not in the expected state after {timeout}s: {info}")
            time.sleep(0.3)


@contextlib.contextmanager
def own_cluster():
    """A single-node cluster of this test module's own, in a fresh state folder on free ports, stopped after."""
    if os.geteuid() != 0:
        _no_slurm("not root (the local cluster's daemons run as root)")
    state_dir = tempfile.mkdtemp(prefix="wemem-slurm-test-", dir="/tmp")  # short: munge socket path
    env = dict(os.environ, WEMEM_SLURMCTLD_PORT=str(_free_port()), WEMEM_SLURMD_PORT=str(_free_port()))
    env.pop("SLURM_CONF", None)
    try:
        proc = subprocess.run(
            ["bash", SCRIPT, "start", state_dir], env=env, capture_output=True, text=True, timeout=600
        )
    except subprocess.TimeoutExpired:
        proc = None
    if proc is None or proc.returncode != 0:
        subprocess.run(["bash", SCRIPT, "stop", state_dir], capture_output=True, timeout=120)
        logs = ""
        for name in ("munged.log", "slurmctld.log", "slurmd.log"):
            path = os.path.join(state_dir, "log", name)
            if os.path.exists(path):
                logs += f"\n--- {name}\n" + "".join(open(path, errors="replace").readlines()[-15:])
        shutil.rmtree(state_dir, ignore_errors=True)
        _no_slurm("`local_cluster.sh start` failed:\n" + ("timed out" if proc is None else proc.stderr[-3000:]) + logs)
    conf = os.path.join(state_dir, "slurm.conf")
    assert proc.stdout.strip() == f"export SLURM_CONF={conf}"
    try:
        yield Cluster(conf, state_dir, started_here=True)
    finally:
        stop = subprocess.run(["bash", SCRIPT, "stop", state_dir], capture_output=True, text=True, timeout=120)
        shutil.rmtree(state_dir, ignore_errors=True)
        assert stop.returncode == 0, stop.stderr


@pytest.fixture(scope="module")
def cluster():
    """The running cluster of SLURM_CONF (CI starts one), else one of our own."""
    conf = os.environ.get("SLURM_CONF")
    if conf and shutil.which("sinfo") and _sinfo_answers(dict(os.environ)):
        yield Cluster(conf, os.path.dirname(conf), started_here=False)
        return
    with own_cluster() as started:
        yield started


def test_two_gpu_jobs_run_together_with_their_own_cuda_device(cluster, tmp_path):
    wrap = (
        'date +%s.%N > {0}.start; echo "CVD=${{CUDA_VISIBLE_DEVICES-unset}}" > {0}.env; sleep 3; date +%s.%N > {0}.end'
    )
    ids = [
        cluster.sbatch("--gres=gpu:1", "-c", "1", "-o", str(tmp_path / f"{n}.out"), "--wrap", wrap.format(tmp_path / n))
        for n in "ab"
    ]
    for job_id in ids:
        info = cluster.wait_state(job_id, lambda i: i["JobState"] in ("COMPLETED", "FAILED", "CANCELLED"))
        assert info["JobState"] == "COMPLETED", info
    seen = {(tmp_path / f"{n}.env").read_text().strip() for n in "ab"}
    assert seen == {"CVD=0", "CVD=1"}
    (a0, a1), (b0, b1) = [[float((tmp_path / f"{n}.{e}").read_text()) for e in ("start", "end")] for n in "ab"]
    assert a0 < b1 and b0 < a1, f"jobs did not overlap: a {a0}-{a1}, b {b0}-{b1}"


def test_afterok_on_a_failed_job_never_runs(cluster, tmp_path):
    bad = cluster.sbatch("-o", str(tmp_path / "bad.out"), "--wrap", "exit 3")
    pending = cluster.sbatch(
        f"--dependency=afterok:{bad}",
        "-o",
        str(tmp_path / "pending.out"),
        "--wrap",
        f"touch {tmp_path / 'pending.ran'}",
    )
    killed = cluster.sbatch(
        f"--dependency=afterok:{bad}",
        "--kill-on-invalid-dep=yes",
        "-o",
        str(tmp_path / "killed.out"),
        "--wrap",
        f"touch {tmp_path / 'killed.ran'}",
    )
    info = cluster.wait_state(bad, lambda i: i["JobState"] not in ("PENDING", "RUNNING", "COMPLETING"))
    assert (info["JobState"], info["ExitCode"]) == ("FAILED", "3:0")
    # Slurm's default: pending for ever; with --kill-on-invalid-dep=yes: cancelled.
    info = cluster.wait_state(pending, lambda i: i["Reason"] == "DependencyNeverSatisfied")
    assert info["JobState"] == "PENDING"
    info = cluster.wait_state(killed, lambda i: i["JobState"] != "PENDING")
    assert (info["JobState"], info["Reason"]) == ("CANCELLED", "DependencyNeverSatisfied")
    time.sleep(1)
    assert cluster.job(pending)["JobState"] == "PENDING"
    cluster.run("scancel", pending)
    assert cluster.wait_state(pending, lambda i: i["JobState"] != "PENDING")["JobState"] == "CANCELLED"
    for name in ("pending", "killed"):
        assert not (tmp_path / f"{name}.ran").exists() and not (tmp_path / f"{name}.out").exists()


def test_submitit_without_sacct(cluster, tmp_path, monkeypatch):
    """What the comment at the top of local_cluster.sh says about submitit, checked."""
    submitit = pytest.importorskip("submitit", reason="submitit is not installed (pip install submitit)")
    monkeypatch.setenv("SLURM_CONF", cluster.conf)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    wrapper_dir = os.path.join(cluster.state_dir, "bin")  # .ci/run puts it on PATH: take it off here
    plain_path = os.pathsep.join(
        p for p in os.environ["PATH"].split(os.pathsep) if os.path.abspath(p) != os.path.abspath(wrapper_dir)
    )
    monkeypatch.setenv("PATH", plain_path)
    executor = submitit.AutoExecutor(folder=tmp_path / "plain", cluster="slurm")
    executor.update_parameters(timeout_min=5, slurm_partition="debug", cpus_per_task=1, slurm_gres="gpu:1")
    job = executor.submit(submitit.helpers.CommandFunction(["bash", "-c", "echo hi; echo $CUDA_VISIBLE_DEVICES"]))
    assert re.fullmatch(r"\d+", job.job_id)
    assert job.result() in ("hi\n0", "hi\n1")  # waits for the result pickle, no sacct needed
    assert job.done() and job.state == "UNKNOWN" and job.get_info() == {}  # plain sacct fails
    # With the sacct wrapper (`sacct -c`, job completion data) first on PATH, the state is real.
    monkeypatch.setenv("PATH", wrapper_dir + os.pathsep + plain_path)
    executor = submitit.AutoExecutor(folder=tmp_path / "wrapped", cluster="slurm")
    executor.update_parameters(timeout_min=5, slurm_partition="debug", cpus_per_task=1)
    job = executor.submit(submitit.helpers.CommandFunction(["sleep", "60"]))
    cluster.wait_state(job.job_id, lambda i: i["JobState"] == "RUNNING")
    job.cancel()
    deadline = time.time() + 20
    while not job.done(force_check=True) and time.time() < deadline:
        time.sleep(0.5)
    assert job.state == "CANCELLED"


def test_start_again_then_stop(cluster):
    if cluster.started_here:
        check_start_again_then_stop(cluster)
    else:  # never stop the cluster CI started: a second one of our own beside it
        with own_cluster() as own:
            check_start_again_then_stop(own)


def check_start_again_then_stop(cluster):
    again = cluster.script("start")
    assert again.returncode == 0 and "already running" in again.stderr, again.stderr
    assert again.stdout.strip() == f"export SLURM_CONF={cluster.conf}"
    up = cluster.script("status")
    assert up.returncode == 0 and re.search(r"debug\*\s+up", up.stdout), up.stdout
    pid_files = [os.path.join(cluster.state_dir, "run", f"{d}.pid") for d in ("munged", "slurmctld", "slurmd")]
    pids = [int(open(p).read().strip()) for p in pid_files]
    assert all(os.path.exists(f"/proc/{pid}") for pid in pids)
    stop = cluster.script("stop")
    assert stop.returncode == 0, stop.stderr
    down = cluster.script("status")
    assert down.returncode == 1 and "not running" in down.stdout, down.stdout
    assert [
        pid
        for pid in pids
        if os.path.exists(f"/proc/{pid}/cmdline") and cluster.state_dir in open(f"/proc/{pid}/cmdline").read()
    ] == []
    assert not _sinfo_answers(cluster.env)
    assert cluster.script("stop").returncode == 0  # idempotent

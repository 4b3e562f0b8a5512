#!/usr/bin/env bash
# Single-node Slurm on this machine, for tests and first tries (not for production).
#
#   bash slurm/local_cluster.sh start  [STATE_DIR]   # install if missing, start, print `export SLURM_CONF=...`
#   bash slurm/local_cluster.sh status [STATE_DIR]   # sinfo; exit 0 if up, 1 if not
#   bash slurm/local_cluster.sh stop   [STATE_DIR]   # cancel jobs, end the daemons by pid file
#
#   eval "$(bash slurm/local_cluster.sh start)"      # then sbatch/squeue/sinfo/submitit use it
#
# STATE_DIR defaults to ${WEMEM_SLURM_DIR:-/tmp/wemem-slurm}. Everything lives there: slurm.conf,
# gres.conf, the munge key, socket and seed, the spool and state-save folders, logs, pid files, the
# fake GPU device nodes. /etc/slurm and /etc/munge are not read or written (SLURM_CONF and
# `slurmctld/slurmd -f` point Slurm at STATE_DIR/slurm.conf; munged gets --socket/--key-file/
# --pid-file/--seed-file/--log-file; slurm.conf has AuthInfo=socket=...). Needs root (the daemons
# run as root, SlurmUser=root) and, the first time, apt (Debian 12: Slurm 22.05.8, munge 0.5.15).
# Ports: WEMEM_SLURMCTLD_PORT (6817) and WEMEM_SLURMD_PORT (6818); a second cluster running at the
# same time (another STATE_DIR) needs other ports. WEMEM_SLURM_TIMEOUT (60 s): wait for an idle node.
#
# The node: `hostname -s`, NodeAddr=127.0.0.1, CPUs=nproc, RealMemory=90% of MemTotal, Gres=gpu:2,
# one partition `debug` (Default=YES, MaxTime=INFINITE). No cgroups: proctrack/linuxproc, task/none,
# select/cons_tres with CR_CPU, so two `-c 1` jobs run at once on 2 cores. Jobs leave
# squeue/scontrol 300 s (MinJobAge) after they end.
#
# Fake GPUs (checked with Slurm 22.05.8). Slurm sets CUDA_VISIBLE_DEVICES only for gres with
# File= entries in gres.conf, and slurmd stat()s every File= for its major/minor number. Plain
# regular files do NOT work: slurmd logs "error: .../nvidia0 is not a valid character or block
# device, fix your gres.conf" and jobs get SLURM_GPUS_ON_NODE=1 but no CUDA_VISIBLE_DEVICES. So we
# create character devices STATE_DIR/dev/nvidia0 and nvidia1 with `mknod c 1 3` (the numbers of
# /dev/null: harmless if anything opens them). With AutoDetect=off and no cgroups, a job with
# --gres=gpu:1 gets CUDA_VISIBLE_DEVICES (and SLURM_JOB_GPUS, GPU_DEVICE_ORDINAL) = the index of
# its device: 0 for one job, 1 for a second one running at the same time. A job without --gres
# gets no CUDA_VISIBLE_DEVICES at all, even if the submitting shell had one (Slurm removes it).
# These are not GPUs: CUDA code in a job still finds none on a CPU-only machine.
#
# submitit 1.5.4 against this cluster (checked on this machine, see tests/test_slurm_cluster.py):
#   * No slurmdbd, and Slurm 22.05 ships only accounting_storage/none and /slurmdbd, so plain
#     `sacct` fails ("Slurm accounting storage is disabled", exit 1). We set
#     JobCompType=jobcomp/filetxt: `sacct -c` (job completion data, STATE_DIR/log/jobcomp.txt)
#     then lists ENDED jobs with their State (COMPLETED, FAILED, CANCELLED, ...); pending and
#     running jobs are not in it.
#   * submitit runs plain `sacct -o JobID,State,NodeList --parsable2 -j ID`: it logs "Bypassing
#     sacct error ..." and job.state stays "UNKNOWN", job.get_info() {}. What works without sacct:
#     executor.submit (sbatch), job.job_id, job.paths, job.stdout()/stderr(), job.cancel()
#     (scancel), and job.done()/wait()/result(), which look for the result pickle in the submitit
#     folder: result() returns as soon as the job's Python code has ended (1 s for a short job),
#     with the value or a FailedJobError carrying the traceback. What does not: job.state, and
#     waiting on a job that ends without writing a result (scancel'ed, killed, a dependency that
#     can never be met): done() stays False, so wait()/result() would hang for ever. Without the
#     wrapper below, wait with a bounded loop on job.done() and look at `scontrol show job ID`
#     (JobState, kept 300 s after the end) or `squeue -h -j ID`.
#   * The fix: `start` writes a two-line wrapper STATE_DIR/bin/sacct that runs `sacct -c "$@"`.
#     With `export PATH=STATE_DIR/bin:$PATH`, submitit's job.state is UNKNOWN while the job is
#     pending/running (which submitit counts as not done) and the real end state after it ends
#     (COMPLETED, FAILED, CANCELLED), so done()/wait() also return for cancelled jobs and
#     result() then raises UncompletedJobError "(state: CANCELLED)".
#   * Dependencies: --dependency=afterok:ID on a job that FAILED stays PENDING with
#     Reason=DependencyNeverSatisfied for ever (Slurm's default: scancel it), unless submitted with
#     --kill-on-invalid-dep=yes: then Slurm cancels it at once (JobState=CANCELLED,
#     Reason=DependencyNeverSatisfied). It never runs either way. In submitit:
#     slurm_additional_parameters={"dependency": "afterok:ID", "kill_on_invalid_dep": "yes"}
#     (or AutoExecutor's slurm_dependency=...).
#   * A submitit job with slurm_gres="gpu:1" sees CUDA_VISIBLE_DEVICES=0 (or 1), as above.
set -euo pipefail

CMD="${1:-}"
STATE_DIR="$(realpath -m "${2:-${WEMEM_SLURM_DIR:-/tmp/wemem-slurm}}")"
CTLD_PORT="${WEMEM_SLURMCTLD_PORT:-6817}"
SLURMD_PORT="${WEMEM_SLURMD_PORT:-6818}"
TIMEOUT="${WEMEM_SLURM_TIMEOUT:-60}"
NODE="$(hostname -s)"
CONF="$STATE_DIR/slurm.conf"
MUNGE_SOCKET="$STATE_DIR/munge/munge.socket.2"
PID_MUNGED="$STATE_DIR/run/munged.pid"
PID_CTLD="$STATE_DIR/run/slurmctld.pid"
PID_SLURMD="$STATE_DIR/run/slurmd.pid"
export SLURM_CONF="$CONF"

die() { echo "local_cluster.sh: ERROR: $*" >&2; exit 1; }
say() { echo "local_cluster.sh: $*" >&2; }

# pid from a pid file if that process is alive AND is the daemon of this STATE_DIR (its argv[0]
# is the binary and its command line names a path in STATE_DIR), so a recycled pid is never touched.
live_pid() {  # PIDFILE BINARY
    local pid cmdline argv0
    [[ -s "$1" ]] || return 1
    pid="$(tr -dc '0-9' < "$1")"
    [[ -n "$pid" && -r "/proc/$pid/cmdline" ]] || return 1
    cmdline="$( (tr '\0' ' ' < "/proc/$pid/cmdline") 2>/dev/null)" || return 1
    argv0="${cmdline%% *}"
    [[ "${argv0##*/}" == "$2" && "$cmdline" == *"$STATE_DIR/"* ]] || return 1
    echo "$pid"
}

# slurmstepd processes of this cluster's jobs: slurmstepd inherits slurmd's environment, which
# has SLURM_CONF=STATE_DIR/slurm.conf (they are reparented to init, so the pid tree can't tell).
stepd_pids() {
    local p
    for p in $(pgrep -x slurmstepd 2>/dev/null || true); do
        if (tr '\0' '\n' < "/proc/$p/environ") 2>/dev/null | grep -qxF "SLURM_CONF=$CONF"; then
            echo "$p"
        fi
    done
}

node_state() { sinfo -h -N -n "$NODE" -o '%T' 2>/dev/null | head -n1; }

port_in_use() {  # PORT: something listens on it (IPv4 or IPv6)
    local hex
    hex="$(printf ':%04X ' "$1")"
    awk -v h="$hex" '$4 == "0A" && index($2, h) { found = 1 } END { exit !found }' \
        /proc/net/tcp /proc/net/tcp6 2>/dev/null
}

install_if_missing() {
    local missing=0 b
    for b in slurmctld slurmd sinfo sbatch munged; do
        command -v "$b" >/dev/null 2>&1 || missing=1
    done
    [[ $missing == 0 ]] && return 0
    [[ $(id -u) == 0 ]] || die "Slurm is not installed and installing it needs root"
    command -v apt-get >/dev/null 2>&1 || die "Slurm is not installed and there is no apt-get"
    say "installing slurmctld slurmd slurm-client munge with apt-get (about 13 MB; log: $STATE_DIR/log/apt.log)"
    mkdir -p "$STATE_DIR/log"
    local log="$STATE_DIR/log/apt.log"
    apt-get update > "$log" 2>&1 || { tail -n 20 "$log" >&2; die "apt-get update failed"; }
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        slurmctld slurmd slurm-client munge >> "$log" 2>&1 \
        || { tail -n 20 "$log" >&2; die "apt-get install of Slurm failed"; }
}

write_config() {
    local cpus mem_mb
    cpus="$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)"
    mem_mb=$(( $(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024 * 9 / 10 ))
    mkdir -p "$STATE_DIR"/{munge,run,log,ctld,slurmd,dev,bin}
    chmod 755 "$STATE_DIR"
    chmod 755 "$STATE_DIR/munge"  # munged: the socket dir must be searchable by all
    if [[ ! -s "$STATE_DIR/munge/munge.key" ]]; then
        (umask 077; head -c 1024 /dev/urandom > "$STATE_DIR/munge/munge.key")
    fi
    chmod 400 "$STATE_DIR/munge/munge.key"
    # Fake GPUs: character devices with /dev/null's numbers (see the comment at the top).
    local i
    for i in 0 1; do
        [[ -c "$STATE_DIR/dev/nvidia$i" ]] || { rm -f "$STATE_DIR/dev/nvidia$i"; mknod -m 666 "$STATE_DIR/dev/nvidia$i" c 1 3; }
    done
    cat > "$CONF" <<EOF
# Written by slurm/local_cluster.sh: rewritten on every fresh start, do not edit.
ClusterName=wemem
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCKET
StateSaveLocation=$STATE_DIR/ctld
SlurmdSpoolDir=$STATE_DIR/slurmd
SlurmctldPidFile=$PID_CTLD
SlurmdPidFile=$PID_SLURMD
SlurmctldLogFile=$STATE_DIR/log/slurmctld.log
SlurmdLogFile=$STATE_DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$STATE_DIR/log/jobcomp.txt
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
GresTypes=gpu
ReturnToService=2
MinJobAge=300
KillWait=5
MailProg=/bin/true
InactiveLimit=0
NodeName=$NODE NodeAddr=127.0.0.1 NodeHostname=$NODE CPUs=$cpus RealMemory=$mem_mb Gres=gpu:2 State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
    cat > "$STATE_DIR/gres.conf" <<EOF
# Written by slurm/local_cluster.sh: two fake GPUs (character devices with /dev/null's numbers).
AutoDetect=off
NodeName=$NODE Name=gpu File=$STATE_DIR/dev/nvidia[0-1]
EOF
    # Optional sacct wrapper (see the top): job completion data instead of accounting.
    cat > "$STATE_DIR/bin/sacct" <<EOF
#!/bin/sh
exec /usr/bin/sacct -c "\$@"
EOF
    chmod 755 "$STATE_DIR/bin/sacct"
}

wait_until() {  # SECONDS COMMAND...: until COMMAND succeeds, at most SECONDS
    local limit="$1" t0=$SECONDS
    shift
    until "$@" >/dev/null 2>&1; do
        (( SECONDS - t0 < limit )) || return 1
        sleep 0.5
    done
}

wait_node_idle() {
    local t0=$SECONDS resumed=0 st
    while true; do
        st="$(node_state)"
        [[ "$st" =~ ^(idle|mixed|allocated|completing)$ ]] && return 0
        # A node recovered from an earlier run may come back down/drained: resume it once.
        if [[ $resumed == 0 && "$st" =~ (down|drain) ]] && (( SECONDS - t0 > 5 )); then
            scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true
            resumed=1
        fi
        if (( SECONDS - t0 >= TIMEOUT )); then
            sinfo -N -l >&2 || true
            tail -n 20 "$STATE_DIR/log/slurmctld.log" "$STATE_DIR/log/slurmd.log" >&2 || true
            die "node $NODE not idle after ${TIMEOUT}s (state: '${st:-no answer}'); logs in $STATE_DIR/log"
        fi
        sleep 0.5
    done
}

all_running() {
    live_pid "$PID_MUNGED" munged >/dev/null && live_pid "$PID_CTLD" slurmctld >/dev/null \
        && live_pid "$PID_SLURMD" slurmd >/dev/null
}

# End the processes PID...: SIGTERM to all, wait up to 15 s, then SIGKILL to those left, and wait.
end_pids() {
    local pid i left
    (( $# )) || return 0
    kill -TERM "$@" 2>/dev/null || true
    for ((i = 0; i < 75; i++)); do
        left=()
        for pid in "$@"; do kill -0 "$pid" 2>/dev/null && left+=("$pid"); done
        (( ${#left[@]} )) || return 0
        sleep 0.2
    done
    say "pids ${left[*]} did not exit after SIGTERM, sending SIGKILL"
    kill -KILL "${left[@]}" 2>/dev/null || true
    local killed=("${left[@]}")
    for ((i = 0; i < 25; i++)); do
        left=()
        for pid in "${killed[@]}"; do kill -0 "$pid" 2>/dev/null && left+=("$pid"); done
        (( ${#left[@]} )) || return 0
        sleep 0.2
    done
    die "pids ${left[*]} are still alive"
}

do_stop() {
    local pid p i
    # Cancel this cluster's jobs first, so that no job (slurmstepd) outlives the daemons.
    if live_pid "$PID_CTLD" slurmctld >/dev/null && [[ -n "$(squeue -h -o %i 2>/dev/null)" ]]; then
        scancel --quiet $(squeue -h -o %i) 2>/dev/null || true
        for ((i = 0; i < 40; i++)); do
            [[ -z "$(squeue -h -t R,CG -o %i 2>/dev/null)$(stepd_pids)" ]] && break
            sleep 0.2
        done
    fi
    # Daemons and leftover job steps together; munged is not needed for a clean shutdown.
    local pids=()
    pid="$(live_pid "$PID_SLURMD" slurmd)" && pids+=("$pid")
    pid="$(live_pid "$PID_CTLD" slurmctld)" && pids+=("$pid")
    pid="$(live_pid "$PID_MUNGED" munged)" && pids+=("$pid")
    for p in $(stepd_pids); do pids+=("$p"); done
    end_pids "${pids[@]}"
    rm -f "$PID_SLURMD" "$PID_CTLD" "$PID_MUNGED"
    say "stopped (state kept in $STATE_DIR)"
}

do_start() {
    [[ $(id -u) == 0 ]] || die "must run as root (the daemons run as root)"
    install_if_missing
    if all_running; then
        say "already running in $STATE_DIR"
        wait_node_idle
        echo "export SLURM_CONF=$CONF"
        return 0
    fi
    # Some but not all daemons alive (crash, killed): restart all of them cleanly.
    if live_pid "$PID_MUNGED" munged >/dev/null || live_pid "$PID_CTLD" slurmctld >/dev/null \
        || live_pid "$PID_SLURMD" slurmd >/dev/null; then
        say "partly running in $STATE_DIR: stopping what runs, then starting again"
        do_stop
    fi
    (( ${#MUNGE_SOCKET} < 100 )) || die "state dir path too long for a unix socket: $MUNGE_SOCKET"
    # munged wants every folder above its socket searchable by all (o+x).
    local d="$STATE_DIR"
    while d="$(dirname "$d")" && [[ "$d" != / ]]; do
        [[ "$(stat -c %A "$d" 2>/dev/null)" == *[xt] ]] \
            || die "munged needs o+x on every folder above its socket; not so for $d (chmod o+x it, or choose another STATE_DIR)"
    done
    local port
    for port in "$CTLD_PORT" "$SLURMD_PORT"; do
        port_in_use "$port" && die "port $port is in use (another Slurm?); set WEMEM_SLURMCTLD_PORT/WEMEM_SLURMD_PORT"
    done
    write_config
    rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock" "$PID_MUNGED" "$PID_CTLD" "$PID_SLURMD"

    munged --socket="$MUNGE_SOCKET" --key-file="$STATE_DIR/munge/munge.key" \
        --pid-file="$PID_MUNGED" --seed-file="$STATE_DIR/munge/munged.seed" \
        --log-file="$STATE_DIR/log/munged.log" \
        || die "munged failed to start; see $STATE_DIR/log/munged.log"
    wait_until 20 live_pid "$PID_MUNGED" munged \
        || die "munged did not start; see $STATE_DIR/log/munged.log"
    wait_until 20 test -S "$MUNGE_SOCKET" || die "munged made no socket $MUNGE_SOCKET"

    slurmctld -f "$CONF" || die "slurmctld failed to start; see $STATE_DIR/log/slurmctld.log"
    wait_until 30 scontrol ping \
        || die "slurmctld does not answer; see $STATE_DIR/log/slurmctld.log"
    wait_until 10 live_pid "$PID_CTLD" slurmctld \
        || die "no slurmctld pid file $PID_CTLD"

    slurmd -f "$CONF" || die "slurmd failed to start; see $STATE_DIR/log/slurmd.log"
    wait_until 20 live_pid "$PID_SLURMD" slurmd \
        || die "slurmd did not start; see $STATE_DIR/log/slurmd.log"

    wait_node_idle
    say "started in $STATE_DIR (node $NODE: $(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc) CPUs, gpu:2 fake)"
    echo "export SLURM_CONF=$CONF"
}

do_status() {
    local up=1
    all_running && up=0
    if [[ $up == 0 ]] && sinfo >/dev/null 2>&1; then
        echo "running in $STATE_DIR (SLURM_CONF=$CONF)"
        sinfo
        return 0
    fi
    echo "not running in $STATE_DIR"
    local n
    for n in munged:"$PID_MUNGED" slurmctld:"$PID_CTLD" slurmd:"$PID_SLURMD"; do
        live_pid "${n#*:}" "${n%%:*}" >/dev/null && echo "  ${n%%:*} still alive (pid $(cat "${n#*:}"))"
    done
    return 1
}

case "$CMD" in
    start) do_start ;;
    stop) do_stop ;;
    status) do_status ;;
    *) echo "usage: bash $0 start|stop|status [STATE_DIR]" >&2; exit 2 ;;
esac

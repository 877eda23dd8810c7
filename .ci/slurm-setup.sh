#!/usr/bin/env bash
# One-node SLURM cluster on this machine, for tests/slurm (pytest -m slurm).
#
#   bash .ci/slurm-setup.sh          # as root; idempotent: a no-op when the node is already idle
#
# Installs Debian's slurm-wlm + munge (apt) when missing, writes /etc/slurm/slurm.conf for
# one node = this host (all its CPUs, no GPUs), starts munged, slurmctld and slurmd without
# systemd (CI containers have none), and waits until `sinfo` shows the node idle.
# Choices made for containers: proctrack/linuxproc + task/none (no cgroup delegation needed),
# no accounting daemon (so no sacct: tests poll squeue/scontrol), JobRequeue=1 so that
# `scontrol requeue` works, SlurmdParameters=config_overrides so a CPU count that differs
# from the detected topology is not a reason to drain the node.
set -euo pipefail

CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
NODE=$(hostname -s)
CPUS=$(nproc)
MEM_MB=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
WAIT_S=${SLURM_SETUP_WAIT_S:-60}

log() { echo "slurm-setup: $*" >&2; }

node_state() { sinfo -h -N -n "$NODE" -o %T 2>/dev/null | head -n1 | tr -d '*~#'; }

if command -v sinfo >/dev/null; then
    case "$(node_state)" in
        idle|mixed|allocated) log "node $NODE already up ($(node_state)); nothing to do"; exit 0 ;;
    esac
fi

if [ "$(id -u)" != 0 ]; then
    log "must run as root (installs packages, starts daemons)"; exit 1
fi

# ------------------------------------------------------------------ packages
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
    log "installing slurm-wlm and munge"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    # policy-rc.d in containers refuses service starts during install; we start daemons below.
    apt-get install -y -q --no-install-recommends slurm-wlm munge >/dev/null
fi

# ------------------------------------------------------------------ munge
if [ ! -s /etc/munge/munge.key ]; then
    log "creating munge key"
    if command -v mungekey >/dev/null; then mungekey --create --keyfile=/etc/munge/munge.key
    else dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none; fi
fi
chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
install -d -o munge -g munge -m 0755 /run/munge
install -d -o munge -g munge -m 0700 /var/log/munge /var/lib/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    log "starting munged"
    runuser -u munge -- /usr/sbin/munged
    for _ in $(seq 20); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.5; done
    munge -n | unmunge >/dev/null || { log "munged does not answer"; exit 1; }
fi

# ------------------------------------------------------------------ slurm.conf
install -d -m 0755 "$CONF_DIR" /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/slurm
NEW_CONF=$(cat <<EOF
# Written by .ci/slurm-setup.sh: one-node test cluster on $NODE.
ClusterName=rotnet-ci
SlurmctldHost=$NODE
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
MpiDefault=none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
SlurmctldTimeout=60
SlurmdTimeout=60
InactiveLimit=0
MinJobAge=600
KillWait=30
Waittime=0
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
)
if [ ! -f "$CONF" ] || [ "$(cat "$CONF")" != "$NEW_CONF" ]; then
    log "writing $CONF"
    printf '%s\n' "$NEW_CONF" > "$CONF"
    # cgroup.conf is read by some plugins even with proctrack/linuxproc; keep it inert.
    printf 'CgroupPlugin=autodetect\nIgnoreSystemd=yes\n' > "$CONF_DIR/cgroup.conf"
fi

# ------------------------------------------------------------------ daemons
running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
if ! running /run/slurm/slurmctld.pid; then
    log "starting slurmctld"
    /usr/sbin/slurmctld
fi
if ! running /run/slurm/slurmd.pid; then
    log "starting slurmd"
    /usr/sbin/slurmd
fi

# ------------------------------------------------------------------ wait for an idle node
deadline=$(( $(date +%s) + WAIT_S ))
while :; do
    state=$(node_state || true)
    case "$state" in
        idle|mixed|allocated) log "node $NODE is $state"; break ;;
        down|drain*|fail*)    scontrol update NodeName="$NODE" State=RESUME 2>/dev/null || true ;;
    esac
    if [ "$(date +%s)" -ge "$deadline" ]; then
        log "node $NODE not idle after ${WAIT_S}s (state: ${state:-none}); logs in /var/log/slurm/"
        tail -n 20 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log >&2 || true
        exit 1
    fi
    sleep 1
done
sinfo

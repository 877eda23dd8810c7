# Shared body of slurm/train.sbatch and slurm/eval.sbatch (sourced, not submitted).
#
#   rotnet_run SCRIPT.py [ARGS...]   launch SCRIPT on every allocated GPU, wait, requeue if asked
#
# Environment (all optional; sbatch passes the submitting shell's environment through):
#   MODE=srun|torchrun   srun: one task per GPU, rotnet/distributed.py reads SLURM_PROCID/LOCALID/NTASKS
#                        (default). torchrun: one srun task per node running torchrun with a c10d
#                        rendezvous on the allocation's first node.
#   ROTNET_DIR           repository root (default: the folder sbatch was called from)
#   PYTHON               interpreter (default: python3 on PATH, e.g. an activated venv)
#   GPUS_PER_NODE        torchrun mode: workers per node (default: SLURM_GPUS_ON_NODE, else tasks per node)
#   RDZV_PORT            torchrun mode: c10d rendezvous port on the first node (default 29500)
#   MAX_RESTARTS         torchrun mode: --max-restarts, whole-group restarts after a crash (default 0)
#   MAX_REQUEUES         stop requeueing after this many restarts of the job (default 50)
#
# Stop / requeue protocol (see slurm/README.md):
#   SLURM sends USR1 to THIS SHELL 120 s before the time limit (--signal=B:USR1@120). The trap
#   forwards SIGTERM to the job's steps (scancel --signal=TERM, which reaches every process of
#   the step: torchrun and its workers, or the srun tasks). train.py finishes its step, rank 0
#   checkpoints, every rank exits 3 (rotnet.preemption.REQUEUE_EXIT_CODE). Exit code 3, or a
#   stop that this shell forwarded followed by a non-zero exit (torchrun reports a signal as 1),
#   becomes `scontrol requeue`; the requeued job resumes from train.output_dir by itself.
#   SIGTERM to this shell without a USR1 before it (plain `scancel`, the hard time limit,
#   preemption) is forwarded the same way, so the run still checkpoints, but the job is not
#   requeued: a cancelled job must stay cancelled (SLURM requeues preempted jobs itself).
#   Exit code 3 without any signal here (steps signalled directly) is requeued too.
# Why not deliver USR1 to the steps directly: torchrun has no USR1 handler, so USR1 would kill
# the launcher (default action) while its workers are still writing the checkpoint.

REQUEUE_EXIT_CODE=3
_rotnet_stop=0        # USR1 came: checkpoint, then requeue
_rotnet_cancel=0      # TERM came to this shell (scancel, time limit, preemption): checkpoint, no requeue
_rotnet_pid=

_rotnet_log() { echo "[$(date +%H:%M:%S) ${SLURM_JOB_ID:-nojob}] $*" >&2; }

_rotnet_forward() {   # $1: signal this shell got
    if [ "$1" = USR1 ]; then _rotnet_stop=1; else _rotnet_cancel=1; fi
    _rotnet_log "got SIG$1: asking the job's steps to checkpoint and stop (SIGTERM)"
    scancel --signal=TERM "$SLURM_JOB_ID" 2>/dev/null || { [ -n "$_rotnet_pid" ] && kill -TERM "$_rotnet_pid"; }
}

rotnet_run() {
    local script=$1; shift
    # Convenience: a bare YAML path as the first argument means --config PATH.
    case "${1:-}" in *.yaml|*.yml) [ "${1#*=}" = "$1" ] && set -- --config "$@" ;; esac
    cd "${ROTNET_DIR:-${SLURM_SUBMIT_DIR:-.}}" || exit 1
    local py=${PYTHON:-python3} mode=${MODE:-srun}
    local nodes=${SLURM_JOB_NUM_NODES:-1} tpn=${SLURM_NTASKS_PER_NODE:-1} cpt=${SLURM_CPUS_PER_TASK:-1}
    tpn=${tpn%%(*}   # "8(x4)" form on heterogeneous layouts
    # One OpenMP/intra-op thread pool per rank sized to its CPUs, not to the whole node.
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$cpt}
    # Progress bars redraw with \r: noise in a log file. Epoch lines and log.jsonl remain.
    export ROTNET_PROGRESS=${ROTNET_PROGRESS:-0}
    local cmd
    case "$mode" in
        srun)
            # srun does not inherit --cpus-per-task from sbatch (SLURM >= 22.05): pass it on.
            cmd=(srun --kill-on-bad-exit=0 --wait="${STEP_WAIT_S:-120}" --cpus-per-task="$cpt" "$py" "$script" "$@") ;;
        torchrun)
            local head nproc
            head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
            # Restarted worker groups must not reuse the rendezvous store's stale keys
            # (pytorch/pytorch#135712: hangs or "connectFullMesh ... Connection refused").
            export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
            nproc=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-0}}
            [ "$nproc" -gt 0 ] 2>/dev/null || nproc=$tpn   # CPU-only allocations: one worker per task slot
            cmd=(srun --kill-on-bad-exit=1 --nodes="$nodes" --ntasks="$nodes" --ntasks-per-node=1 --cpus-per-task=$((cpt * tpn))
                 "$py" -m torch.distributed.run --nnodes="$nodes" --nproc_per_node="$nproc"
                 --rdzv_backend=c10d --rdzv_endpoint="$head:${RDZV_PORT:-29500}" --rdzv_id="$SLURM_JOB_ID"
                 --max-restarts="${MAX_RESTARTS:-0}" "$script" "$@") ;;
        *) _rotnet_log "MODE=$mode: expected srun or torchrun"; exit 2 ;;
    esac
    _rotnet_log "start (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST in $PWD: ${cmd[*]}"
    trap '_rotnet_forward USR1' USR1
    trap '_rotnet_forward TERM' TERM
    # In the background so the traps run while we wait (bash defers traps until a foreground
    # command returns); `wait` returns early on a trap, hence the loop.
    "${cmd[@]}" &
    _rotnet_pid=$!
    while kill -0 "$_rotnet_pid" 2>/dev/null; do wait "$_rotnet_pid"; done
    wait "$_rotnet_pid"; local rc=$?
    trap - USR1 TERM
    _rotnet_log "step exited with code $rc"
    if [ "$_rotnet_cancel" = 1 ] && [ "$_rotnet_stop" = 0 ]; then
        # `scancel JOBID` also sends SIGTERM here, and a job requeued now would come back:
        # a TERM without a USR1 first means "stop", not "continue later".
        _rotnet_log "job cancelled or out of time: not requeueing; submit again to resume"
        exit "$rc"
    fi
    if [ "$rc" -eq "$REQUEUE_EXIT_CODE" ] || { [ "$_rotnet_stop" = 1 ] && [ "$rc" -ne 0 ]; }; then
        if [ "${SLURM_RESTART_COUNT:-0}" -ge "${MAX_REQUEUES:-50}" ]; then
            _rotnet_log "not requeueing: already restarted ${SLURM_RESTART_COUNT} times (MAX_REQUEUES)"
            exit "$rc"
        fi
        _rotnet_log "checkpoint written: requeueing job $SLURM_JOB_ID (it resumes from its output folder)"
        # Requeue kills this shell; the requeued job keeps its id and appends to the same log.
        scontrol requeue "$SLURM_JOB_ID" && exit 0
        _rotnet_log "scontrol requeue failed (job cancelled or JobRequeue=0?): resubmit to continue"
    fi
    exit "$rc"
}

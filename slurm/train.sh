#!/bin/bash
# Multi-task fine-tuning on Slurm: one torchrun per node, preemption-safe.
#
#   sbatch slurm/train.sh [training flags...]              # 1 node, 8 GPUs
#   sbatch -N 4 slurm/train.sh --config my.yaml            # 4 nodes x 8 GPUs
#   sbatch --gpus-per-node=0 slurm/train.sh                # CPU-only nodes (gloo)
#
# Before the time limit Slurm sends USR1 to this shell (--signal below); the training
# then writes a checkpoint and exits, this script requeues the job, and the next run
# resumes from that checkpoint (--resume auto). TERM at the time limit is handled the
# same way; a finished run, a crash and a job cancelled with scancel are not requeued.
# Options on the sbatch command line override the #SBATCH lines; environment knobs are
# listed below and in docs/slurm.md.
#
#SBATCH --job-name=mtl_dist        # names the log file and the default run directory
#SBATCH --nodes=1                  # nodes; sbatch -N 4 for more
#SBATCH --ntasks-per-node=1        # one torchrun launcher per node; it starts the workers
#SBATCH --gpus-per-node=8          # GPUs per node, one worker each (0 on CPU-only nodes)
#SBATCH --cpus-per-task=32         # CPU cores per node, shared by its workers
#SBATCH --time=24:00:00            # wall-clock limit of one run; a requeue starts anew
#SBATCH --output=slurm-%x-%j.out   # log file, one per job id (kept across requeues)
#SBATCH --open-mode=append         # a requeued run appends to the log instead of truncating
#SBATCH --requeue                  # the job may be requeued (by this script or on node failure)
#SBATCH --signal=B:USR1@300        # USR1 to this shell 300 s before the limit: checkpoint time

set -uo pipefail

say() { echo "[slurm/train.sh $(date '+%F %T')] $*"; }

if [ -z "${SLURM_JOB_ID:-}" ]; then
    echo "slurm/train.sh: submit it with sbatch (see docs/slurm.md)" >&2
    exit 2
fi

# ---- knobs ---------------------------------------------------------------------------
# Workers per node: default the GPUs Slurm gave this node; 0 = one CPU worker (gloo).
NGPU=${NGPU:-${SLURM_GPUS_ON_NODE:-0}}
NNODES=${SLURM_JOB_NUM_NODES:-1}
PYTHON=${PYTHON:-python3}
TRAIN_MODULE=${TRAIN_MODULE:-mtl_dist.train}
CONFIG=${CONFIG:-}                  # --config YAML file
DS_CONFIG=${DS_CONFIG:-}            # --deepspeed JSON file
TRAIN_ARGS=${TRAIN_ARGS:-}          # more flags, split on whitespace
# The job id survives a requeue, so the resumed run finds its own directory.
OUTPUT_DIR=${OUTPUT_DIR:-runs/${SLURM_JOB_NAME:-mtl_dist}-$SLURM_JOB_ID}
# Rendezvous port on the first node; derived from the job id so jobs sharing a node
# do not collide.
MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
MAX_REQUEUES=${MAX_REQUEUES:-20}    # a run that keeps getting interrupted stops here
REQUEUE_MARKER=REQUEUE              # written in OUTPUT_DIR by the training: "requeue me"
EXIT_REQUEUE=75                     # the training's exit status for the same
RESEND_EVERY=${RESEND_EVERY:-30}    # seconds between repeats of a stop request

# ---- the training command ------------------------------------------------------------
args=()
[ -n "$CONFIG" ] && args+=(--config "$CONFIG")
[ -n "$DS_CONFIG" ] && args+=(--deepspeed "$DS_CONFIG")
read -r -a extra <<< "$TRAIN_ARGS"
args+=("${extra[@]}" "$@")
# The last --output_dir given wins, as in the training's own parser; the marker is
# looked for there.
for ((i = 0; i < ${#args[@]}; i++)); do
    case ${args[i]} in
        --output_dir=*) OUTPUT_DIR=${args[i]#--output_dir=} ;;
        --output_dir) OUTPUT_DIR=${args[i + 1]:-$OUTPUT_DIR} ;;
    esac
done
if [ "$NGPU" -gt 0 ]; then
    nproc=$NGPU
else
    nproc=1
    args+=(--device cpu)
    # A GPU request Slurm did not report (a gres set up without GPU types, an old Slurm)
    # would otherwise train on one CPU without a word.
    if command -v nvidia-smi > /dev/null && nvidia-smi -L 2> /dev/null | grep -q '^GPU'; then
        say "warning: GPUs are visible but NGPU=0: training on CPU." \
            "Set NGPU or sbatch --gpus-per-node to use them"
    fi
fi
# Always last: a requeued run must pick up the newest checkpoint, whatever else was given.
args=(--output_dir "$OUTPUT_DIR" "${args[@]}" --resume auto)

cpus=${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-1}}
threads=$((cpus / nproc))
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$((threads > 0 ? threads : 1))}
export PYTHONUNBUFFERED=1

head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
say "job $SLURM_JOB_ID run $((${SLURM_RESTART_COUNT:-0} + 1)) on $SLURM_JOB_NODELIST:" \
    "$NNODES node(s) x $nproc worker(s), rendezvous $head_node:$MASTER_PORT," \
    "output $OUTPUT_DIR"

# On each node: the torchrun agent ignores USR1 (its default action would kill it), and
# its workers inherit that until the training installs its own handler. The first node
# hosts the rendezvous store; saying so spares torchrun guessing from host names.
# shellcheck disable=SC2016  # expanded by the inner shell, on each node
launch='trap "" USR1
host=0; [ "$SLURM_NODEID" = 0 ] && host=1
exec "$0" -m torch.distributed.run --rdzv_conf "is_host=$host" "$@"'

# A marker left by an earlier run must not make this one look interrupted.
rm -f "$OUTPUT_DIR/$REQUEUE_MARKER"

# ---- run, forwarding the warning signal ----------------------------------------------
# srun passes USR1 on to every process of the step on every node. On TERM (job
# cancelled, preempted, or at the time limit) Slurm signals the step itself; USR1 is
# sent as well in case only this shell got TERM. The shell runs a trap only while it
# waits, hence `srun ... &` and `wait` below.
step_pid=
stop_signal=
stop_at=0
resend_pid=
# shellcheck disable=SC2317  # called from the traps
stop_requested() {
    stop_signal=$1
    printf -v stop_at '%(%s)T' -1
    say "got SIG$1: asking the training to checkpoint and stop"
    forward_stop
}
# shellcheck disable=SC2317  # called from stop_requested and after the launch
forward_stop() {
    [ -n "$step_pid" ] || return 0
    kill -USR1 "$step_pid" 2> /dev/null
    # A worker ignores USR1 until its training loop has started (model and data loading
    # can take minutes), so one signal may be lost: repeat it until the step ends. The
    # training acts on the first one it sees and ignores the rest.
    if [ -z "$resend_pid" ]; then
        (while sleep "$RESEND_EVERY" && kill -USR1 "$step_pid" 2> /dev/null; do :; done) &
        resend_pid=$!
    fi
}
# Whether the signal came at this run's time limit (TERM then means "out of time", not
# "cancelled"): StartTime + TimeLimit from slurmctld, which a cancel does not change.
# shellcheck disable=SC2317  # called after a TERM
at_time_limit() {
    local info start limit days=0 part seconds=0
    info=$(scontrol show job -o "$SLURM_JOB_ID" 2> /dev/null) || return 1
    [[ $info =~ StartTime=([^ ]+) ]] && start=$(date -d "${BASH_REMATCH[1]}" +%s) ||
        return 1
    # TimeLimit is [days-]hours:minutes:seconds, or UNLIMITED.
    [[ $info =~ TimeLimit=(([0-9]+)-)?([0-9:]+)( |$) ]] || return 1
    days=${BASH_REMATCH[2]:-0}
    IFS=: read -r -a limit <<< "${BASH_REMATCH[3]}"
    for part in "${limit[@]}"; do seconds=$((seconds * 60 + 10#$part)); done
    [ "$stop_at" -ge $((start + days * 86400 + seconds - 5)) ]
}
trap 'stop_requested USR1' USR1
trap 'stop_requested TERM' TERM

srun --nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1 --cpus-per-task="$cpus" \
    --kill-on-bad-exit=1 \
    bash -c "$launch" "$PYTHON" \
    --nnodes="$NNODES" --nproc_per_node="$nproc" --max_restarts=0 \
    --rdzv_id="$SLURM_JOB_ID" --rdzv_backend=c10d --rdzv_endpoint="$head_node:$MASTER_PORT" \
    -m "$TRAIN_MODULE" "${args[@]}" &
step_pid=$!
# A signal that came during the setup above is passed on now.
[ -n "$stop_signal" ] && forward_stop

# The shell runs a trap only between commands: `wait` returns early (status > 128) when
# a signal arrives, so wait again until srun itself has exited.
while :; do
    wait "$step_pid"
    rc=$?
    if [ "$rc" -gt 128 ] && kill -0 "$step_pid" 2> /dev/null; then
        continue
    fi
    break
done
[ -n "$resend_pid" ] && kill "$resend_pid" 2> /dev/null

# ---- requeue if the training asked for it --------------------------------------------
# torchrun reports a worker's exit status 75 as a plain failure (1), so the marker
# file is what tells "requeue me" apart from a crash. A run stopped by USR1 that did not
# finish is requeued even without the marker: when one node's launcher exits first,
# srun (--kill-on-bad-exit) ends the others, possibly before the marker is written, and
# the newest checkpoint is the best a stopped run can resume from anyway. TERM at the
# time limit (the warning came too late for the checkpoint, or never) is treated the
# same. Any other TERM means the job is being cancelled (scancel, or preemption, which
# Slurm requeues itself under PreemptMode=REQUEUE): the checkpoint is kept, and a requeue
# would bring a cancelled job back.
wants_requeue=0
if [ "$stop_signal" = TERM ] && at_time_limit; then
    say "SIGTERM came at the time limit"
    stop_signal="TERM at the time limit"
fi
if [ "$stop_signal" = TERM ]; then
    say "stopped by SIGTERM (cancelled or preempted; status $rc): not requeueing." \
        "Resubmit with OUTPUT_DIR=$OUTPUT_DIR to resume from its newest checkpoint"
    exit "$rc"
elif [ -e "$OUTPUT_DIR/$REQUEUE_MARKER" ] || [ "$rc" -eq "$EXIT_REQUEUE" ]; then
    wants_requeue=1
elif [ -n "$stop_signal" ] && [ "$rc" -ne 0 ]; then
    say "the training stopped (status $rc) after SIG$stop_signal without its marker"
    wants_requeue=1
fi
if [ "$wants_requeue" = 1 ]; then
    restarts=${SLURM_RESTART_COUNT:-0}
    if [ "$restarts" -ge "$MAX_REQUEUES" ]; then
        say "not requeueing: the job was already requeued $restarts times" \
            "(MAX_REQUEUES); resubmit with the same OUTPUT_DIR to continue"
        exit "$EXIT_REQUEUE"
    fi
    say "requeueing job $SLURM_JOB_ID: the next run resumes from the newest checkpoint"
    if scontrol requeue "$SLURM_JOB_ID"; then
        exit 0
    fi
    say "scontrol requeue failed; resubmit with the same OUTPUT_DIR to resume"
    exit "$EXIT_REQUEUE"
fi
say "training ended with status $rc"
exit "$rc"

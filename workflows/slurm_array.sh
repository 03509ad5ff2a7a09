#!/usr/bin/env bash
# qsmprep on a SLURM cluster: one participant per array task, in the Apptainer image.
#
#   n=$(tail -n +2 /data/bids/participants.tsv | grep -c .)
#   BIDS_DIR=/data/bids OUT_DIR=/data/derivatives/qsmprep SIF=/images/qsmprep.sif \
#     sbatch --array=1-"$n" workflows/slurm_array.sh
#
#   # check what task 3 would run, without running it (no SLURM needed):
#   BIDS_DIR=... OUT_DIR=... SIF=... bash workflows/slurm_array.sh --dry-run --task-id 3
#
# Task i processes the i-th participant (1-based) of PARTICIPANTS, a file with one label per
# line (with or without "sub-"), default the participant_id column of BIDS_DIR/participants.tsv.
# The Nipype work directory of a participant is WORK_ROOT/sub-<label>, on scratch, named by the
# participant and not by the job: a task that is requeued (preemption, node failure;
# `#SBATCH --requeue`) or resubmitted reuses it and Nipype's cache skips every finished node.
# Compute nodes need no network: the image holds the templates and the trained weights.
#
# Environment (export it or put it before sbatch; sbatch passes the environment on):
#   BIDS_DIR      BIDS dataset (bound read-only)                                  required
#   OUT_DIR       derivatives folder (created)                                    required
#   SIF           Apptainer image (apptainer build qsmprep.sif docker://...); empty: run the
#                 qsmprep of PATH (a pip install on a shared filesystem) without a container
#   PARTICIPANTS  list of participants                    default BIDS_DIR/participants.tsv
#   WORK_ROOT     work directories    default $SCRATCH/qsmprep_work, else $TMPDIR or /tmp
#                 (node-local: resumption then only works on the same node)
#   QSMPREP_ARGS  further qsmprep options, e.g. "--methods tkd tv medi --bg-method vsharp"
#   NPROCS        processes for Nipype      default SLURM_CPUS_PER_TASK, else 1
#   MEM_GB        memory for Nipype         default from SLURM_MEM_PER_NODE, else unset
#   GPU=1         pass the GPU into the container (--nv) and run inversions with --device cuda
#   APPTAINER     apptainer or singularity  default: whichever is installed (apptainer first)
#   DRY_RUN=1     print the command of the task and exit (same as --dry-run)
#
#SBATCH --job-name=qsmprep
#SBATCH --cpus-per-task=4
#SBATCH --mem=16G
#SBATCH --time=04:00:00
#SBATCH --requeue
#SBATCH --output=qsmprep_%A_%a.log
set -euo pipefail

task_id=${SLURM_ARRAY_TASK_ID:-}
dry_run=${DRY_RUN:-0}
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --task-id) task_id=${2:?--task-id needs a number}; shift ;;
    --task-id=*) task_id=${1#--task-id=} ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed 's/^# \{0,1\}//;/^set -euo/d'; exit 0 ;;
    *) echo "slurm_array.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done

die() { echo "slurm_array.sh: $*" >&2; exit 1; }
: "${BIDS_DIR:?set BIDS_DIR to the BIDS dataset}"
: "${OUT_DIR:?set OUT_DIR to the output folder}"
[ -n "$task_id" ] || die "no task id: run as a SLURM array job (sbatch --array=1-N) or give --task-id N"
[[ "$task_id" =~ ^[0-9]+$ ]] && [ "$task_id" -ge 1 ] || die "task id must be a positive integer, got '$task_id'"
BIDS_DIR=$(realpath -m "$BIDS_DIR")
OUT_DIR=$(realpath -m "$OUT_DIR")

# the participant of this task
list=${PARTICIPANTS:-$BIDS_DIR/participants.tsv}
[ -f "$list" ] || die "participant list $list not found (set PARTICIPANTS to a file, one label per line)"
if [[ "$list" == *.tsv ]]; then
  mapfile -t labels < <(awk -F'\t' 'NR > 1 && $1 != "" {print $1}' "$list")
else
  mapfile -t labels < <(awk '!/^[[:space:]]*(#|$)/ {print $1}' "$list")
fi
n=${#labels[@]}
[ "$task_id" -le "$n" ] || die "task $task_id but only $n participant(s) in $list (use --array=1-$n)"
label=${labels[$((task_id - 1))]}
label=${label#sub-}
label=${label%$'\r'}

# resources and the work directory of this participant
nprocs=${NPROCS:-${SLURM_CPUS_PER_TASK:-1}}
mem_gb=${MEM_GB:-}
if [ -z "$mem_gb" ] && [ -n "${SLURM_MEM_PER_NODE:-}" ]; then
  mem_gb=$((SLURM_MEM_PER_NODE * 9 / 10 / 1024))  # MB -> GB, with a 10 % margin
  [ "$mem_gb" -ge 1 ] || mem_gb=1
fi
work_root=${WORK_ROOT:-${SCRATCH:+$SCRATCH/qsmprep_work}}
work_root=${work_root:-${TMPDIR:-/tmp}/qsmprep_work}
work_dir=$work_root/sub-$label

opts=(participant --participant-label "$label" --nprocs "$nprocs" --omp-nthreads 1)
[ -z "$mem_gb" ] || opts+=(--mem-gb "$mem_gb")
[ "${GPU:-0}" != 1 ] || opts+=(--device cuda)
# shellcheck disable=SC2206  # QSMPREP_ARGS is split into words on purpose
[ -z "${QSMPREP_ARGS:-}" ] || opts+=(${QSMPREP_ARGS})

if [ -n "${SIF:-}" ]; then
  runner=${APPTAINER:-$(command -v apptainer || command -v singularity || echo apptainer)}
  runner=$(basename "$runner")
  flags=(run --cleanenv)
  [ "${GPU:-0}" != 1 ] || flags+=(--nv)
  flags+=(-B "$BIDS_DIR:/data:ro" -B "$OUT_DIR:/out" -B "$work_dir:/work")
  cmd=("$runner" "${flags[@]}" "$SIF" /data /out "${opts[@]}" -w /work)
else
  cmd=(qsmprep "$BIDS_DIR" "$OUT_DIR" "${opts[@]}" -w "$work_dir")
fi

if [ "$dry_run" = 1 ]; then
  printf '%q ' "${cmd[@]}" | sed 's/ $//'
  echo
  exit 0
fi

mkdir -p "$OUT_DIR" "$work_dir"
echo "qsmprep task $task_id/$n: sub-$label on $(hostname), work dir $work_dir" \
  "(restart ${SLURM_RESTART_COUNT:-0})"
exec "${cmd[@]}"

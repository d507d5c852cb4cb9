#!/usr/bin/env bash
# Runs an rlt_jax entry point on every worker of a Cloud TPU VM pod slice: one process per worker, all of a worker's
# chips per process, one global mesh (JAX finds the workers itself: the program runs with --distributed=auto).
#
#   launch/tpu_pod.sh [options] TPU_NAME ZONE -- [ARGS for the entry point ...]
#   launch/tpu_pod.sh my-v5p-64 us-east5-a -- --config configs/rlt_qwen2.5_7b_v5p64.py --workdir /mnt/shared/runs/rlt \
#       --config.teacher_path=/mnt/shared/teacher_sft --config.student_path=/mnt/shared/Bespoke-Stratos-7B \
#       --config.data.path=/mnt/shared/bespoke_stratos_17k --config.steps=125
#
# Options:
#   --project P       gcloud project (default: gcloud's configured one)
#   --module M        entry point (default rlt_jax.train; also rlt_jax.sft, rlt_jax.evaluate ...)
#   --remote_dir D    where the code goes on each worker (default ~/rlt_jax)
#   --no_install      reuse the code and virtual environment already on the workers
#   --restarts N      rerun the entry point up to N times on the workers when it stops with status 75 (default 0)
#   --dry_run         print the gcloud commands instead of running them
#
# Preemption: SIGTERM (a maintenance event or a VM shutdown) or SIGUSR1 to the processes makes them finish the step in
# flight, write a checkpoint and exit with status 75 (rlt_jax.preemption.STOPPED_STATUS); with --restarts N each
# worker starts the same command again at once and the run resumes from that checkpoint. When the slice itself went
# away (a spot/preemptible slice deleted), run this script again with the same arguments once it is back (add
# --no_install when the workers kept the code): the run resumes from its last checkpoint in the workdir. Set
# --config.checkpoint_every_minutes to bound what a kill without warning loses.
#
# Steps: (1) pack this checkout (tracked and untracked-but-not-ignored files, so local edits travel too) and copy it
# to every worker; (2) on every worker, unpack it into a fresh D/code and install it, with the TPU build of the pinned
# jax, into the virtual environment D/venv; (3) run `python -m M --distributed=auto ARGS` in D/code on every worker
# at once (`gcloud compute tpus tpu-vm ssh --worker=all`), each argument quoted as given. Process 0's output (metrics,
# progress bar) shows here; the other workers only print warnings and errors.
#
# The workdir and every path in the config (models, data) must be the same on every worker: a shared filesystem
# (Filestore/NFS, a gcsfuse mount) for the workdir, since all workers write checkpoint shards into it. This script
# starts processes on the workers and stops none: if a previous run still holds the TPU chips, stop it yourself
# (by its PID on each worker) before launching.
set -euo pipefail

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }

project=""
module="rlt_jax.train"
remote_dir='~/rlt_jax'
install=1
restarts=0
dry_run=0
positional=()
while (( $# > 0 )); do
  case "$1" in
    --project) project="$2"; shift 2 ;;
    --module) module="$2"; shift 2 ;;
    --remote_dir) remote_dir="$2"; shift 2 ;;
    --no_install) install=0; shift ;;
    --restarts) restarts="$2"; shift 2 ;;
    --dry_run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    -*) echo "tpu_pod.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
    *) positional+=("$1"); shift ;;
  esac
done
if (( ${#positional[@]} != 2 )); then
  echo "tpu_pod.sh: expected TPU_NAME and ZONE before --, got: ${positional[*]:-nothing}" >&2; usage >&2; exit 2
fi
if ! [[ "$restarts" =~ ^[0-9]+$ ]]; then
  echo "tpu_pod.sh: --restarts takes a count (0, 1, ...), got '$restarts'" >&2; exit 2
fi
tpu="${positional[0]}"
zone="${positional[1]}"
args=("$@")

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
jax_version="$(sed -n 's/.*"jax==\([0-9.]*\)".*/\1/p' "$repo/setup.py")"
if [[ -z "$jax_version" ]]; then
  echo "tpu_pod.sh: cannot read the pinned jax version from $repo/setup.py" >&2; exit 1
fi
gcloud_tpu=(gcloud compute tpus tpu-vm)
where=(--zone "$zone" --worker=all)
[[ -n "$project" ]] && where+=(--project "$project")

run() {
  if (( dry_run )); then printf '%q ' "$@"; echo; else "$@"; fi
}

# On each worker: D/code (replaced on every launch, so no stale files) and D/venv (kept; pip only adds what changed).
code="$remote_dir/code"
venv="$remote_dir/venv"
if (( install )); then
  archive="$(mktemp -t rlt_jax_code.XXXXXX)"
  trap 'rm -f "$archive"' EXIT
  (cd "$repo" && git ls-files -z --cached --others --exclude-standard | tar -czf "$archive" --null -T -)
  run "${gcloud_tpu[@]}" scp "$archive" "$tpu:/tmp/rlt_jax_code.tar.gz" "${where[@]}"
  setup="set -e; if [ -e $remote_dir ] && [ ! -e $remote_dir/.made_by_tpu_pod_sh ]; then"
  setup+=" echo \"$remote_dir exists but tpu_pod.sh did not make it; pass another --remote_dir\" >&2; exit 1; fi;"
  setup+=" mkdir -p $remote_dir; touch $remote_dir/.made_by_tpu_pod_sh; rm -rf $code; mkdir $code;"
  setup+=" tar -xzf /tmp/rlt_jax_code.tar.gz -C $code; [ -x $venv/bin/python ] || python3 -m venv $venv;"
  # The package's pins, with the TPU build (libtpu) of the pinned jax.
  setup+=" $venv/bin/pip install -q -e $code 'jax[tpu]==$jax_version'"
  run "${gcloud_tpu[@]}" ssh "$tpu" "${where[@]}" --command "$setup"
fi

quoted="$(printf '%q ' "${args[@]+"${args[@]}"}")"
entry="$venv/bin/python -m $(printf '%q' "$module") --distributed=auto $quoted"
# Status 75: stopped on a signal after a checkpoint; each worker reruns (the others stopped at the same step).
command="cd $code && for attempt in \$(seq 0 $restarts); do $entry && exit 0; status=\$?;"
command+=" [ \$status -eq 75 ] && [ \$attempt -lt $restarts ] || exit \$status;"
command+=" echo \"tpu_pod.sh: stopped with status 75; restart \$((attempt + 1)) of $restarts\" >&2; done"
run "${gcloud_tpu[@]}" ssh "$tpu" "${where[@]}" --command "$command"

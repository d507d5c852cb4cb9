#!/usr/bin/env bash
# Runs one command as N JAX processes on this machine, each with D fake CPU devices: a multi-host run in miniature,
# for tests and debugging.
#
#   launch/local_multiprocess.sh [-n PROCESSES] [-d DEVICES_PER_PROCESS] [-p PORT] [-l LOG_DIR] -- COMMAND [ARGS...]
#   launch/local_multiprocess.sh -n 2 -d 4 -- python -m rlt_jax.train --config configs/tiny.py --workdir runs/mp
#
# Defaults: -n 2, -d 4, a free port, a new temporary log folder. Process i runs COMMAND with RLT_COORDINATOR=
# localhost:PORT, RLT_NUM_PROCESSES=N, RLT_PROCESS_ID=i (rlt_jax.distributed.initialize reads them; any other
# program can too), JAX_PLATFORMS=cpu and --xla_force_host_platform_device_count=D added to XLA_FLAGS. Process 0
# prints to this terminal, process i >= 1 writes LOG_DIR/process_i.log.
#
# Exit status: 0 when every process succeeds, else that of the first process to fail. A process that dies leaves the
# others waiting for it forever inside a collective, so the first failure stops the rest; so do Ctrl-C and the end of
# this script. SIGTERM or SIGUSR1 to this script is passed on to every process: they finish the step, checkpoint and
# exit with status 75 (rlt_jax.preemption.STOPPED_STATUS), which is not a failure (the others are stopping too) and is
# this script's status then. It only ever signals the processes it started, by their PIDs.
set -euo pipefail

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }

processes=2
devices=4
port=""
log_dir=""
while getopts "n:d:p:l:h" opt; do
  case "$opt" in
    n) processes="$OPTARG" ;;
    d) devices="$OPTARG" ;;
    p) port="$OPTARG" ;;
    l) log_dir="$OPTARG" ;;
    h) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
[[ "${1:-}" == "--" ]] && shift
if (( $# == 0 )); then
  echo "local_multiprocess.sh: no command given" >&2; usage >&2; exit 2
fi
for value in "$processes" "$devices"; do
  if ! [[ "$value" =~ ^[1-9][0-9]*$ ]]; then
    echo "local_multiprocess.sh: -n and -d take positive integers, got '$value'" >&2; exit 2
  fi
done
if [[ -z "$port" ]]; then  # a port the OS just handed out, so concurrent runs do not collide
  port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("localhost", 0)); print(s.getsockname()[1])')"
fi
log_dir="${log_dir:-$(mktemp -d -t rlt_multiprocess.XXXXXX)}"
mkdir -p "$log_dir"

# A device count already in XLA_FLAGS (e.g. from a test runner) would fight the one given here: drop it.
xla_flags="$(sed -E 's/--xla_force_host_platform_device_count=[0-9]+//g' <<< "${XLA_FLAGS:-}")"
xla_flags="${xla_flags} --xla_force_host_platform_device_count=$devices"

pids=()
stop_children() {  # SIGKILL: beside a dead process the others wait inside a collective and never reach a handler
  local pid
  for pid in "${pids[@]}"; do
    kill -KILL "$pid" 2>/dev/null || true
  done
}
forward() {  # a signal for the run: every process checkpoints and stops (status 75); keep waiting for them
  local pid
  for pid in "${pids[@]}"; do
    kill "-$1" "$pid" 2>/dev/null || true
  done
}
trap stop_children EXIT
trap 'stop_children; exit 130' INT
trap 'forward TERM' TERM
trap 'forward USR1' USR1

for (( i = 0; i < processes; i++ )); do
  run_env=(RLT_COORDINATOR="localhost:$port" RLT_NUM_PROCESSES="$processes" RLT_PROCESS_ID="$i" JAX_PLATFORMS=cpu
           XLA_FLAGS="${xla_flags# }")
  if (( i == 0 )); then
    env "${run_env[@]}" "$@" &
  else
    env "${run_env[@]}" "$@" > "$log_dir/process_$i.log" 2>&1 &
  fi
  pids+=("$!")
done
echo "local_multiprocess.sh: $processes processes x $devices devices, coordinator localhost:$port, logs of" \
     "processes 1.. in $log_dir" >&2

status=0
stopped=0
live=("${pids[@]}")
while (( ${#live[@]} > 0 )); do
  finished=""
  code=0
  wait -n -p finished "${live[@]}" || code=$?
  if [[ -z "${finished:-}" ]]; then  # -p left it unset
    (( code == 127 )) || continue  # a trapped signal interrupted the wait: no process ended
    # 127: bash had already reaped the process that ended (two ending at once): plain `wait` gives its saved status.
    finished="${live[0]}"
    code=0
    wait "$finished" || code=$?
  fi
  if (( code == 75 )); then  # stopped on a signal after its checkpoint: the others stop at the same step
    stopped=1
    code=0
  fi
  rest=()
  for pid in "${live[@]}"; do
    [[ "$pid" == "$finished" ]] || rest+=("$pid")
  done
  live=("${rest[@]+"${rest[@]}"}")
  if (( code != 0 && status == 0 )); then
    status=$code
    failed="?"
    for (( i = 0; i < processes; i++ )); do
      [[ "${pids[$i]}" == "$finished" ]] && failed=$i
    done
    echo "local_multiprocess.sh: process $failed exited with status $code; stopping the others (logs: $log_dir)" >&2
    stop_children
  fi
done
(( status == 0 && stopped )) && status=75
exit "$status"

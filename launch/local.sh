#!/usr/bin/env bash
# Run one command as N cooperating JAX processes on this machine.
#
# Each process gets PARSCALE_COORDINATOR / PARSCALE_NUM_PROCESSES / PARSCALE_PROCESS_ID, which
# parscale_jax/distributed.py passes to jax.distributed.initialize. With -d, every process also
# pretends to own D CPU devices, so a multi-host mesh can be tried out without any accelerator.
#
# If one process fails the others are stopped (they would otherwise hang in a collective until
# the coordinator times out) and the script exits with the failed process's status.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/local.sh [-n NUM_PROCESSES] [-d DEVICES_PER_PROCESS] [-p PORT] [-l LOG_DIR] COMMAND [ARGS...]

Start COMMAND ARGS as NUM_PROCESSES processes of one multi-process JAX job on this machine.

  -n NUM_PROCESSES        how many processes (default 2)
  -d DEVICES_PER_PROCESS  run on CPU and simulate this many devices per process
                          (sets JAX_PLATFORMS=cpu, JAX_NUM_CPU_DEVICES and XLA_FLAGS)
  -p PORT                 coordinator port on 127.0.0.1 (default: a free port)
  -l LOG_DIR              write process i's output to LOG_DIR/process_i.log instead of
                          printing it with an "[i] " prefix
  -h                      show this help

example:
  launch/local.sh -n 2 -d 4 parscale-jax train --config default --run-dir runs/local2x4 mesh.data=-1
EOF
}

die() { echo "local.sh: $*" >&2; exit 2; }
is_count() { [[ $1 =~ ^[1-9][0-9]*$ ]]; }

num_processes=2
devices=""
port=""
log_dir=""
# The leading ':' lets us report bad options ourselves; getopts stops at the first non-option,
# so options belonging to COMMAND (e.g. `python -c ...`) are left alone.
while getopts ':n:d:p:l:h' opt; do
  case $opt in
    n) is_count "$OPTARG" || die "-n wants a positive integer, got '$OPTARG'"; num_processes=$OPTARG ;;
    d) is_count "$OPTARG" || die "-d wants a positive integer, got '$OPTARG'"; devices=$OPTARG ;;
    p) is_count "$OPTARG" && (( OPTARG < 65536 )) || die "-p wants a port number, got '$OPTARG'"; port=$OPTARG ;;
    l) log_dir=$OPTARG ;;
    h) usage; exit 0 ;;
    :) usage >&2; die "-$OPTARG needs a value" ;;
    *) usage >&2; die "unknown option -$OPTARG" ;;
  esac
done
shift $((OPTIND - 1))
[[ ${1:-} == -- ]] && shift
if (( $# == 0 )); then usage >&2; exit 2; fi

if [[ -z $port ]]; then
  # Ask the OS for a port that is free right now; the tiny race until process 0 binds it is
  # acceptable for local runs.
  python=""
  for candidate in "${PYTHON:-}" python3 python; do
    if [[ -n $candidate ]] && command -v "$candidate" >/dev/null 2>&1; then python=$candidate; break; fi
  done
  [[ -n $python ]] || die "need python3 to pick a free port (or pass -p PORT)"
  port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi

if [[ -n $log_dir ]]; then
  mkdir -p "$log_dir"
else
  # GNU and recent BSD sed take -u (unbuffered); older macOS sed only has -l (line buffered).
  # Either way each prefixed line appears as soon as the process writes it.
  if sed -u '' </dev/null >/dev/null 2>&1; then sed_flush=-u; else sed_flush=-l; fi
fi

export PARSCALE_COORDINATOR="127.0.0.1:$port"
export PARSCALE_NUM_PROCESSES="$num_processes"
if [[ -n $devices ]]; then
  export JAX_PLATFORMS=cpu
  export JAX_NUM_CPU_DEVICES="$devices"
  export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$devices"
fi

# Job control puts every background job in its own process group (pgid == its pid), so one
# `kill -- -pid` reaches the command, its children and its sed. It also keeps a terminal's
# Ctrl-C away from the children: the trap below forwards it instead, exactly once.
set -m

pids=()
stop_all() {  # stop_all SIGNAL: signal every process group still running
  local pid
  for pid in ${pids[@]+"${pids[@]}"}; do
    kill -"$1" -- "-$pid" 2>/dev/null || true
  done
}

# Give processes a few seconds to exit cleanly after SIGNAL, then kill whatever is left.
shutdown() {
  local signal=$1 waited=0 pid alive
  stop_all "$signal"
  while (( waited < 100 )); do
    alive=0
    for pid in ${pids[@]+"${pids[@]}"}; do kill -0 "$pid" 2>/dev/null && alive=1; done
    (( alive )) || break
    sleep 0.1; waited=$((waited + 1))
  done
  stop_all KILL
  wait 2>/dev/null || true
  trap - EXIT  # all reaped: nothing left for the EXIT trap to kill
}

on_signal() {
  trap - INT TERM
  echo "local.sh: got SIG$1, stopping all processes" >&2
  shutdown "$1"
  [[ $1 == INT ]] && exit 130 || exit 143
}
trap 'on_signal INT' INT
trap 'on_signal TERM' TERM
# Never leave orphans behind if this script ends some other way (set -e, say).
trap 'stop_all KILL' EXIT

for (( i = 0; i < num_processes; i++ )); do
  # Each job is a wrapper subshell that ignores INT/TERM around the real command, which gets
  # the default handlers back. Stopping a job thus stops the command, while the wrapper (and
  # sed) live on to pass on its last words, a traceback say, and to report its status.
  # The wrapper's own stderr goes nowhere: it only carries bash's "Terminated" notices.
  if [[ -n $log_dir ]]; then
    (
      trap '' INT TERM
      ( trap - INT TERM; export PARSCALE_PROCESS_ID=$i; exec "$@" ) </dev/null 2>&1
    ) >"$log_dir/process_$i.log" 2>/dev/null &
  else
    # pipefail makes the job's status the command's, not sed's.
    (
      trap '' INT TERM
      set -o pipefail
      ( trap - INT TERM; export PARSCALE_PROCESS_ID=$i; exec "$@" ) </dev/null 2>&1 |
        sed $sed_flush "s/^/[$i] /"
    ) 2>/dev/null &
  fi
  pids+=("$!")
done
if [[ -n $log_dir ]]; then
  echo "local.sh: $num_processes processes, coordinator $PARSCALE_COORDINATOR, logs in $log_dir/process_*.log" >&2
fi

# Poll instead of `wait -n` so that this also works with bash 3.2 (macOS) and so that we know
# which process finished. `wait PID` on a finished child returns its exit status.
remaining=("${pids[@]}")
while (( ${#remaining[@]} > 0 )); do
  still=()
  for pid in "${remaining[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then still+=("$pid"); continue; fi
    status=0
    wait "$pid" || status=$?
    if (( status != 0 )); then
      for (( i = 0; i < num_processes; i++ )); do [[ ${pids[$i]} == "$pid" ]] && break; done
      echo "local.sh: process $i exited with status $status; stopping the others" >&2
      [[ -n $log_dir ]] && echo "local.sh: see $log_dir/process_$i.log" >&2
      trap - INT TERM
      shutdown TERM
      exit "$status"
    fi
  done
  remaining=(${still[@]+"${still[@]}"})
  (( ${#remaining[@]} > 0 )) && sleep 0.1
done
trap - EXIT
exit 0

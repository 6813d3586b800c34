#!/usr/bin/env bash
# Train on this machine: `launch/local.sh CONFIG [options] [key.sub=value ...]`.
#
#   --cpu-devices N   split the host CPU into N JAX devices per process (meshes without accelerators)
#   --processes P     run P processes joined by jax.distributed on 127.0.0.1 (a multi-host job
#                     on one machine; each process reads its share of the data)
#   --port PORT       the coordinator's port for --processes (default 12355)
#   --grace SECONDS   when one process fails, the others get SIGTERM, then SIGKILL after this
#                     long (default 30), so a job with a hung or frozen process still ends
#   --dry-run         print the commands instead of running them
#
# Example: launch/local.sh configs/tiny.yaml --processes 2 --cpu-devices 4 mesh.dcn_data=2
set -euo pipefail
source "$(dirname "$0")/lib.sh"
usage() { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

config=""; devices=""; processes=1; port=12355; grace=30; DRY_RUN=0; overrides=()
while (($#)); do
  case "$1" in
    --cpu-devices) devices="${2:?--cpu-devices needs a number}"; shift 2 ;;
    --processes) processes="${2:?--processes needs a number}"; shift 2 ;;
    --port) port="${2:?--port needs a number}"; shift 2 ;;
    --grace) grace="${2:?--grace needs a number of seconds}"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage 0 ;;
    *=*) overrides+=("$1"); shift ;;
    -*) echo "launch/local.sh: unknown option $1" >&2; usage 2 ;;
    *) [[ -z "$config" ]] || { echo "launch/local.sh: two configs given: $config $1" >&2; usage 2; }
       config="$1"; shift ;;
  esac
done
[[ -n "$config" ]] || { echo "launch/local.sh: no config file given" >&2; usage 2; }
[[ "$processes" =~ ^[1-9][0-9]*$ ]] || die "--processes must be a positive integer, got $processes"

env_prefix=()
if [[ -n "$devices" ]]; then
  env_prefix=(env "JAX_PLATFORMS=cpu" "XLA_FLAGS=--xla_force_host_platform_device_count=$devices")
fi
cmd=(flaxlm train --config "$config" "${overrides[@]}")
if ((processes == 1)); then
  if ((DRY_RUN)); then run "${env_prefix[@]}" "${cmd[@]}"; else exec "${env_prefix[@]}" "${cmd[@]}"; fi
  exit
fi

# Several processes: the same command, each with its id; wait for all, fail if any fails.
# A process that fails (the hang watchdog's exit, a crash) leaves the others blocked in a
# collective, so they are ended too: SIGTERM (and SIGCONT, should one be stopped), then
# SIGKILL after the grace period.
pids=()
for ((i = 0; i < processes; i++)); do
  joined=("${cmd[@]}" "distributed.coordinator_address=127.0.0.1:$port"
          "distributed.num_processes=$processes" "distributed.process_id=$i")
  if ((DRY_RUN)); then
    run "${env_prefix[@]}" "${joined[@]}"
  else
    "${env_prefix[@]}" "${joined[@]}" &
    pids+=($!)
  fi
done
((DRY_RUN)) && exit 0
end_others() {
  local pid
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null && kill -CONT "$pid" 2>/dev/null; done
  for ((t = 0; t < grace * 10; t++)); do
    jobs -rp | grep -q . || return 0
    sleep 0.1
  done
  for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
}
status=0; running=("${pids[@]}")
while ((${#running[@]})); do
  code=0; finished=""; wait -n -p finished "${running[@]}" 2>/dev/null || code=$?
  [[ -n "${finished:-}" ]] || break  # the rest were reaped while being ended
  left=(); for pid in "${running[@]}"; do [[ "$pid" == "$finished" ]] || left+=("$pid"); done
  running=("${left[@]}")
  if ((code != 0 && status == 0)); then
    status=$code
    echo "launch/local.sh: a process exited with status $code; ending the others" >&2
    end_others
  fi
done
exit "$status"

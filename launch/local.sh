#!/usr/bin/env bash
# Train on this machine: `launch/local.sh CONFIG [key.sub=value ...]`.
#
#   --cpu-devices N   split the host CPU into N JAX devices (to try meshes without accelerators)
#   --dry-run         print the command instead of running it
#
# Example: launch/local.sh configs/tiny.yaml --cpu-devices 8 mesh.data=2 mesh.fsdp=4
set -euo pipefail

usage() { sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

config=""
devices=""
dry_run=0
overrides=()
while (($#)); do
  case "$1" in
    --cpu-devices) devices="${2:?--cpu-devices needs a number}"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage 0 ;;
    *=*) overrides+=("$1"); shift ;;
    *) [[ -z "$config" ]] || { echo "launch/local.sh: two configs given: $config $1" >&2; usage 2; }
       config="$1"; shift ;;
  esac
done
[[ -n "$config" ]] || { echo "launch/local.sh: no config file given" >&2; usage 2; }

cmd=(flaxlm train --config "$config" "${overrides[@]}")
env_prefix=()
if [[ -n "$devices" ]]; then
  env_prefix=(env "JAX_PLATFORMS=cpu" "XLA_FLAGS=--xla_force_host_platform_device_count=$devices")
fi
if ((dry_run)); then
  printf '%q ' "${env_prefix[@]}" "${cmd[@]}"; echo
else
  exec "${env_prefix[@]}" "${cmd[@]}"
fi

#!/usr/bin/env bash
# Train on several TPU slices joined over the data-center network (Multislice).
#
#   launch/multislice.sh --name NAME --zone ZONE --type v5p-128 --slices N [options] \
#       CONFIG [key.sub=value ...]
#
#   --project P          Google Cloud project (default: gcloud's)
#   --runtime VERSION    TPU VM runtime (default v2-alpha-tpuv5)
#   --dir D              where flaxlm lives on the workers (default ~/flaxlm, installed with
#                        `launch/tpu_pod.sh --setup` or a custom image)
#   --dry-run            print the gcloud commands instead of running them
#
# The slices are requested together as one queued resource (--node-count N); the TPU runtime
# sets the MEGASCALE_* variables that join them. The mesh gets mesh.dcn_data=N unless the
# overrides set a DCN axis themselves: data parallelism across slices, FSDP within each.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

name=""; zone=""; type=""; slices=""; project=""; runtime="v2-alpha-tpuv5"; dir="~/flaxlm"
DRY_RUN=0; args=()
while (($#)); do
  case "$1" in
    --name) name="${2:?}"; shift 2 ;;
    --zone) zone="${2:?}"; shift 2 ;;
    --type) type="${2:?}"; shift 2 ;;
    --slices) slices="${2:?}"; shift 2 ;;
    --project) project="${2:?}"; shift 2 ;;
    --runtime) runtime="${2:?}"; shift 2 ;;
    --dir) dir="${2:?}"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage 0 ;;
    *) args+=("$1"); shift ;;
  esac
done
parse_train_args "${args[@]}"
[[ -n "$name" && -n "$zone" && -n "$type" ]] || die "--name, --zone and --type are required"
[[ "$slices" =~ ^[1-9][0-9]*$ ]] || die "--slices must be a positive integer, got '$slices'"
[[ -n "$CONFIG" ]] || die "no config file given"
((${#REST[@]} == 0)) || die "unknown arguments: ${REST[*]}"
gcloud_scope "$zone" "$project"
add_dcn_data "$slices"

run gcloud compute tpus queued-resources create "$name" --accelerator-type="$type" \
  --runtime-version="$runtime" --node-count="$slices" --node-prefix="$name" "${GCLOUD_OPTS[@]}"
wait_active "$name"
train=$(quote flaxlm train --config "$CONFIG" "${OVERRIDES[@]}")
run gcloud compute tpus queued-resources ssh "$name" "${GCLOUD_OPTS[@]}" --node=all --worker=all \
  --batch-size="$slices" --command="cd $dir && $train"

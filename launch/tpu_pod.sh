#!/usr/bin/env bash
# Train on a Cloud TPU VM slice: the same command on every worker.
#
#   launch/tpu_pod.sh --tpu NAME --zone ZONE [options] CONFIG [key.sub=value ...]
#
#   --project P          Google Cloud project (default: gcloud's)
#   --create TYPE        first request the slice as a queued resource, e.g. v5p-128, and wait
#                        until it is ACTIVE (--runtime sets the TPU software version)
#   --runtime VERSION    TPU VM runtime for --create (default v2-alpha-tpuv5)
#   --setup              first install flaxlm on every worker (git clone REPO into DIR)
#   --repo URL, --dir D  where flaxlm comes from and lives on the workers (default ~/flaxlm)
#   --dry-run            print the gcloud commands instead of running them
#
# jax.distributed finds the workers by itself on a TPU pod; every worker reads its share of
# the data and writes its share of each checkpoint, so train.run_dir must be on storage that
# every worker sees (gs://... or a shared file system).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
usage() { sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

tpu=""; zone=""; project=""; create=""; runtime="v2-alpha-tpuv5"; setup=0
repo="https://github.com/flaxlm/flaxlm.git"; dir="~/flaxlm"; DRY_RUN=0; args=()
while (($#)); do
  case "$1" in
    --tpu) tpu="${2:?}"; shift 2 ;;
    --zone) zone="${2:?}"; shift 2 ;;
    --project) project="${2:?}"; shift 2 ;;
    --create) create="${2:?}"; shift 2 ;;
    --runtime) runtime="${2:?}"; shift 2 ;;
    --setup) setup=1; shift ;;
    --repo) repo="${2:?}"; shift 2 ;;
    --dir) dir="${2:?}"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage 0 ;;
    *) args+=("$1"); shift ;;
  esac
done
parse_train_args "${args[@]}"
[[ -n "$tpu" && -n "$zone" ]] || die "--tpu NAME and --zone ZONE are required"
[[ -n "$CONFIG" ]] || die "no config file given"
((${#REST[@]} == 0)) || die "unknown arguments: ${REST[*]}"
gcloud_scope "$zone" "$project"

if [[ -n "$create" ]]; then
  run gcloud compute tpus queued-resources create "$tpu" --node-id="$tpu" \
    --accelerator-type="$create" --runtime-version="$runtime" "${GCLOUD_OPTS[@]}"
  wait_active "$tpu"
fi
if ((setup)); then
  run gcloud compute tpus tpu-vm ssh "$tpu" "${GCLOUD_OPTS[@]}" --worker=all \
    --command="git clone $(quote "$repo") $dir || git -C $dir pull; cd $dir && pip install -e '.[tpu]'"
fi
train=$(quote flaxlm train --config "$CONFIG" "${OVERRIDES[@]}")
run gcloud compute tpus tpu-vm ssh "$tpu" "${GCLOUD_OPTS[@]}" --worker=all \
  --command="cd $dir && $train"

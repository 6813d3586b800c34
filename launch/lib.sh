# Shared by the launch scripts (sourced, not run): argument helpers and --dry-run.

# die MESSAGE: the script's usage error, exit status 2.
die() { echo "$(basename "$0"): $*" >&2; exit 2; }

# run CMD...: runs CMD, or prints it (shell-quoted, one line) when DRY_RUN=1.
run() {
  if ((DRY_RUN)); then
    printf '%q ' "$@" | sed 's/ $//'; echo
  else
    "$@"
  fi
}

# quote ARGS...: the arguments as one shell-quoted string (for commands run on other machines).
quote() { printf '%q ' "$@" | sed 's/ $//'; }

# parse_train_args ARGS...: sets CONFIG and OVERRIDES from `CONFIG [key.sub=value ...]`;
# other arguments are left in REST for the script's own options.
parse_train_args() {
  CONFIG=""; OVERRIDES=(); REST=()
  while (($#)); do
    case "$1" in
      *=*) OVERRIDES+=("$1") ;;
      -*) REST+=("$1") ;;
      *) if [[ -z "$CONFIG" ]]; then CONFIG="$1"; else REST+=("$1"); fi ;;
    esac
    shift
  done
}

# gcloud_scope ZONE PROJECT: sets GCLOUD_OPTS (--zone, and --project when one is given).
gcloud_scope() {
  GCLOUD_OPTS=("--zone=$1")
  [[ -z "$2" ]] || GCLOUD_OPTS+=("--project=$2")
}

# wait_active NAME: waits until the queued resource NAME is ACTIVE (nothing to wait for in
# --dry-run).
wait_active() {
  ((DRY_RUN)) && return 0
  until gcloud compute tpus queued-resources describe "$1" "${GCLOUD_OPTS[@]}" \
      --format='value(state.state)' | grep -q ACTIVE; do sleep 30; done
}

# add_dcn_data N: appends mesh.dcn_data=N to OVERRIDES unless they set a DCN axis already
# (data parallelism across the N slices or nodes, the other axes within each).
add_dcn_data() {
  if [[ " ${OVERRIDES[*]} " != *" mesh.dcn_"* ]]; then OVERRIDES+=("mesh.dcn_data=$1"); fi
}

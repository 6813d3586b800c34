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

#!/usr/bin/env bash
# Train on a SLURM GPU cluster: writes a batch script and submits it with sbatch.
#
#   launch/slurm.sh --nodes N [options] CONFIG [key.sub=value ...]
#
#   --gpus-per-node G    GPUs on each node, one process per node sees all of them (default 8)
#   --partition P        SLURM partition
#   --time HH:MM:SS      wall-clock limit (default 24:00:00)
#   --job-name NAME      (default flaxlm)
#   --dry-run            print the batch script and the sbatch command instead of submitting
#
# One task per node; jax.distributed reads the coordinator, the process count and the process
# id from SLURM's environment. Within a node the devices talk over NVLink (ICI axes), across
# nodes over the network: set mesh.dcn_data (or mesh.dcn_fsdp) to the number of nodes, which is
# the default here unless the overrides set a DCN axis. SIGTERM before the time limit (sent by
# --signal) makes flaxlm save a checkpoint and exit; requeue resumes from it.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
usage() { sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

nodes=""; gpus=8; partition=""; time_limit="24:00:00"; job="flaxlm"; DRY_RUN=0; args=()
while (($#)); do
  case "$1" in
    --nodes) nodes="${2:?}"; shift 2 ;;
    --gpus-per-node) gpus="${2:?}"; shift 2 ;;
    --partition) partition="${2:?}"; shift 2 ;;
    --time) time_limit="${2:?}"; shift 2 ;;
    --job-name) job="${2:?}"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage 0 ;;
    *) args+=("$1"); shift ;;
  esac
done
parse_train_args "${args[@]}"
[[ "$nodes" =~ ^[1-9][0-9]*$ ]] || die "--nodes must be a positive integer, got '$nodes'"
[[ "$gpus" =~ ^[1-9][0-9]*$ ]] || die "--gpus-per-node must be a positive integer, got '$gpus'"
[[ -n "$CONFIG" ]] || die "no config file given"
((${#REST[@]} == 0)) || die "unknown arguments: ${REST[*]}"

((nodes == 1)) || add_dcn_data "$nodes"
script=$(cat <<SBATCH
#!/usr/bin/env bash
#SBATCH --job-name=$job
#SBATCH --nodes=$nodes
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=$gpus
#SBATCH --time=$time_limit
#SBATCH --signal=TERM@300
#SBATCH --requeue
${partition:+#SBATCH --partition=$partition}
srun $(quote flaxlm train --config "$CONFIG" "${OVERRIDES[@]}")
SBATCH
)
if ((DRY_RUN)); then
  echo "$script"
  echo "# submit with: sbatch <this script>"
else
  echo "$script" | sbatch
fi

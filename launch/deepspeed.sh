#!/usr/bin/env bash
# Multi-node training over ssh with DeepSpeed's launcher (pdsh), under the `cpt launch` supervisor.
# Run it on the first node; every host of the hostfile needs passwordless ssh from here, pdsh here,
# and this repository and environment at the same path.
#
#   launch/deepspeed.sh [HOSTFILE [CONFIG]] [key=value ...]
#
# runs exactly:
#
#   $CPT_LAUNCH deepspeed --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
#       --module continual_pt.train --config "$CONFIG" [key=value ...]
#
# HOSTFILE  the DeepSpeed hostfile ("host slots=N" per line, see launch/hostfile.example); from the
#           first argument without "=", else the environment, else launch/hostfile beside this script
# CONFIG    the run config; from the next argument without "=", else the environment (required)
# MASTER_ADDR  rank 0's address as every node reaches it; default: the hostfile's first host
# MASTER_PORT  default 29500
# CPT_LAUNCH   the supervisor command put in front; default "cpt launch --" (it forwards SIGTERM,
#           SIGUSR1 and SIGINT as a stop request to every rank and exits 75 once the checkpoint is
#           committed: rerun the same command to resume). CPT_LAUNCH="" runs the launcher bare.
# Further arguments are run-config overrides (key=value). The remote shells get no PATH from here:
# DeepSpeed forwards PYTHON* variables; put others (OMP_NUM_THREADS=..., NCCL_...) one per line
# in ./.deepspeed_env or the file that DS_ENV_FILE names.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

positional=()
while [ $# -gt 0 ] && [ ${#positional[@]} -lt 2 ] && [[ $1 != *=* ]]; do
    positional+=("$1")
    shift
done
if [ ${#positional[@]} -ge 1 ]; then HOSTFILE=${positional[0]}; fi
if [ ${#positional[@]} -ge 2 ]; then CONFIG=${positional[1]}; fi
HOSTFILE=${HOSTFILE:-$here/hostfile}
if [ -z "${CONFIG:-}" ]; then
    echo "error: no run config: launch/deepspeed.sh [HOSTFILE [CONFIG]] [key=value ...], or set CONFIG" >&2
    exit 2
fi
if [ ! -f "$HOSTFILE" ]; then
    echo "error: no hostfile at $HOSTFILE (copy launch/hostfile.example there, or set HOSTFILE)" >&2
    exit 2
fi

first_host=$(awk '$1 !~ /^#/ && NF { print $1; exit }' "$HOSTFILE")
if [ -z "$first_host" ]; then
    echo "error: $HOSTFILE names no host" >&2
    exit 2
fi
MASTER_ADDR=${MASTER_ADDR:-$first_host}
MASTER_PORT=${MASTER_PORT:-29500}

read -r -a supervisor <<< "${CPT_LAUNCH-cpt launch --}"
exec ${supervisor[@]+"${supervisor[@]}"} deepspeed --hostfile "$HOSTFILE" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
    --module continual_pt.train --config "$CONFIG" "$@"

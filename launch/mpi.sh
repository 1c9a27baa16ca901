#!/usr/bin/env bash
# Train under Open MPI's mpirun; each rank finds its place through mpi4py
# (pip install 'continual-pt[mpi]'), rank 0 picks the rendezvous address and port and sends them
# to the others. Edit nothing here: set the variables below in the environment.
#
#   CONFIG=run.yaml NP=16 HOSTFILE=hosts launch/mpi.sh schedule.max_lr=6e-4
# runs
#   cpt launch -- mpirun -np 16 --hostfile hosts python -m continual_pt.train --config run.yaml schedule.max_lr=6e-4
#
# Arguments after the variables are run-config overrides (key=value). `cpt launch` stands in front
# of mpirun: SIGTERM, SIGUSR1, SIGHUP or a first Ctrl-C sent to this script makes every rank save a
# committed checkpoint at the same step and the script exit 75 (run it again to resume); any other
# status is the run's own (0 finished, 1 non-finite loss, 2 bad input).
#
#   CONFIG       run config YAML (required)
#   NP           number of ranks (default 2)
#   HOSTFILE     Open MPI hostfile ("node1 slots=8" per line; default: this machine only)
#   MPIRUN_ARGS  extra mpirun options, e.g. "--map-by ppr:8:node --bind-to none -x PYTHONPATH"
#   PYTHON       the Python with continual-pt installed on every node (default: python)
#   CPT          the cpt command (default: cpt)
set -euo pipefail

: "${CONFIG:?set CONFIG to the run config YAML}"
NP=${NP:-2}
PYTHON=${PYTHON:-python}
CPT=${CPT:-cpt}

mpirun_args=(-np "$NP")
if [[ -n ${HOSTFILE:-} ]]; then
    mpirun_args+=(--hostfile "$HOSTFILE")
fi
read -r -a extra <<< "${MPIRUN_ARGS:-}"

exec "$CPT" launch -- mpirun "${mpirun_args[@]}" "${extra[@]}" \
    "$PYTHON" -m continual_pt.train --config "$CONFIG" "$@"

"""Train one continual pre-training phase on the DeepSpeed engine: the launchers' entry point.

One process (CPU or one GPU):
    cpt train --config configs/quickstart/rewarm.yaml schedule.max_lr=6e-4
Several GPUs of one node, or a multi-node ssh cluster (hostfile lines: "node1 slots=8"):
    deepspeed --num_gpus 8 -m continual_pt.train --config run.yaml
    deepspeed --hostfile launch/hostfile -m continual_pt.train --config run.yaml
torchrun, SLURM and MPI:
    torchrun --nproc_per_node 8 -m continual_pt.train --config run.yaml
    srun --ntasks-per-node 8 python -m continual_pt.train --config run.yaml
    mpirun -np 16 python -m continual_pt.train --config run.yaml

Exit status: 0 finished (also when the run's checkpoint is already at train.max_steps); 75 stopped
early by SIGTERM, SIGUSR1, a first Ctrl-C (SIGINT) or train.time_limit after saving a committed
checkpoint, or during set-up with nothing new to save (run the same command again to resume; a
second Ctrl-C aborts at once, leaving the last committed checkpoint); 1 the loss became
non-finite; 2 bad input (config, data, checkpoint) or a run dir another run holds, reported
before anything is written.
"""

import sys

from continual_pt.cli import launched_main

if __name__ == "__main__":
    sys.exit(launched_main("train"))

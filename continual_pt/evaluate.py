"""Score checkpoints on named held-out sets: the launchers' entry point of `cpt eval`.

    torchrun --nproc_per_node 8 -m continual_pt.evaluate runs/rewarm --set pile=data/pile
    srun python -m continual_pt.evaluate runs/rewarm --set pile=data/pile --task-index 3

Takes the arguments of `cpt eval`; the scores do not depend on the number of ranks.
"""

import sys

from continual_pt.cli import launched_main

if __name__ == "__main__":
    sys.exit(launched_main("eval"))

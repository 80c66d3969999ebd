"""hpcdistill: on-policy distillation and self-distillation studies on Slurm."""

import os as _os

__version__ = "0.1.0"

# Tasks share nodes (array tasks on one node, several local tasks on a laptop). OpenMP's default
# busy-waiting makes torch 5-10x slower as soon as its threads are oversubscribed (measured here:
# 4 vs 37 tokens/s sampling with SmolLM2 on a loaded 2-core machine). Passive waiting costs little
# when the cores are free. Set before torch loads its OpenMP runtime; a user's setting wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

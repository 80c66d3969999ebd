"""hpcdistill: on-policy distillation and self-distillation studies on Slurm."""

__version__ = "0.1.0"

"""vpd: an open, end-to-end Visual Program Distillation pipeline (Hu et al., CVPR 2024)."""

__version__ = "0.1.0"

"""Masked Motion Encoding (MME, Sun et al., CVPR 2023): a reproducibility suite."""

__version__ = "0.1.0"

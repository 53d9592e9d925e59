"""Which backend computes the motion primitives: compiled CPU kernels or torch.

`mme.motion.descriptors` and `mme.motion.tracking` define each operation once and compute it in two ways: on
CPU tensors with the numba kernels of `mme.motion._kernels` (loops over points, no per-pixel index tables),
elsewhere (cuda) and when the kernels are off or numba is missing, in torch. Both give the same numbers
(to float32 rounding). `MME_COMPILED_KERNELS=0` in the environment, or `COMPILED_KERNELS = False` here,
forces the torch path (the tests compare the two).
"""

from __future__ import annotations

import functools
import os
from types import ModuleType

import torch

COMPILED_KERNELS = os.environ.get("MME_COMPILED_KERNELS", "1") != "0"


def compiled_kernels(tensor: torch.Tensor) -> ModuleType | None:
    """`mme.motion._kernels` for a CPU tensor when `COMPILED_KERNELS` is on and numba imports, else None."""
    if not COMPILED_KERNELS or tensor.device.type != "cpu":
        return None
    return _import_kernels()


@functools.cache
def _import_kernels() -> ModuleType | None:
    try:  # numba is imported here, on the first CPU call, not with the package
        from mme.motion import _kernels
    except ImportError:  # numba missing or incompatible with the installed numpy: the torch path serves
        return None
    return _kernels

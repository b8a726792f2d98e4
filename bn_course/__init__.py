"""bn_course: the helper package of the Batch Normalization course.

Each module holds the final version of one idea the notebooks build in the open.
"""

import os
import random

import numpy as np

__version__ = "0.1.0"


def seed_everything(seed=0):
    """Seed Python, NumPy and PyTorch so that a notebook prints the same numbers every run."""
    random.seed(seed)
    np.random.seed(seed)
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency, but keep numpy-only use light
        return seed
    torch.manual_seed(seed)
    return seed


def get_device():
    """The device the notebooks run on: a GPU when present, else the CPU.

    Set the environment variable ``BN_COURSE_DEVICE`` (e.g. ``cpu``) to override.
    """
    import torch

    wanted = os.environ.get("BN_COURSE_DEVICE")
    if wanted:
        return torch.device(wanted)
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")

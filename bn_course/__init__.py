"""bn_course: the helper package of the Batch Normalization course.

Each module holds the final version of one idea the notebooks build in the open, and
``tests/test_<module>.py`` checks it (against PyTorch where PyTorch has the same thing).
Where each notebook's code lives:

- 00 start here: ``claims`` (the ledger of claims the course tests)
- 01 why normalize: ``activations``, ``widgets`` (the sliders of 01 and 02)
- 02-03 deriving BN, BN in NumPy: ``numpy_bn``, ``checks`` (the exercise checkers)
- 04 BN in PyTorch: ``torch_bn``, ``classic_bugs``
- 05 training with BN: ``training_with_batchnorm``
- 06 why does it work: ``covariate_shift``, ``landscape``
- 07 regularization and noise: ``generalization``
- 08 inference and pitfalls: ``pitfalls``, ``fold``
- 09 beyond BN: ``norms``
- 10 BN at scale: ``sync_bn``, ``launch``, ``bench``, ``fused_bn``, ``triton_bn``
- shared by the notebooks: ``data``, ``models``, ``train``, ``sweep``, ``recording``, ``report``
  (the run-time table) and ``_validate`` (the checks behind the clear error messages)
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

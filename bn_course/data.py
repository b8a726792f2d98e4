"""The course's data: scikit-learn's bundled handwritten digits, as tensors. Nothing downloads.

API overview
------------
``load_digits_split(test_fraction=0.25, seed=0, device=None, n_train=None) -> DigitsSplit``
    A deterministic, stratified train/test split of the 1797 8x8 digits.
    ``x_*``: float32 ``(N, 64)``, standardized with the *training* mean and std of each
    pixel (so no test information leaks into training); ``y_*``: int64 ``(N,)`` in 0..9.
    ``n_train`` keeps only that many training examples (a stratified subset), for
    experiments on small training sets.
``batches(x, y, batch_size, seed=0) -> iterator of (x_batch, y_batch)``
    An endless stream of minibatches: each epoch is a fresh permutation drawn from a
    ``torch.Generator`` seeded with ``seed``, so the order is the same on every run.
    Incomplete batches at the end of an epoch are dropped, so every batch has
    ``batch_size`` rows (batch norm needs more than one value per channel).
``check_class_labels(y, n_classes=None, n=None, outputs=None)``
    Raises a clear error unless ``y`` is what ``F.cross_entropy`` expects: a 1-D int64 tensor
    of labels in 0..n_classes-1 (n of them, when ``n`` is given).
"""

from dataclasses import dataclass

import numpy as np
import torch

IMAGE_SHAPE = (1, 8, 8)
N_CLASSES = 10


@dataclass
class DigitsSplit:
    """A train/test split of the digits as tensors.

    x_train: (N_train, 64) float32, y_train: (N_train,) int64,
    x_test:  (N_test, 64)  float32, y_test:  (N_test,)  int64,
    mean, std: (64,) float32, the training statistics used to standardize both parts.
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor

    @property
    def n_classes(self):
        return N_CLASSES

    def to(self, device):
        """The same split with every tensor on ``device``."""
        return DigitsSplit(*(t.to(device) for t in (self.x_train, self.y_train, self.x_test,
                                                     self.y_test, self.mean, self.std)))

    def __repr__(self):
        return (f"DigitsSplit(train={tuple(self.x_train.shape)}, test={tuple(self.x_test.shape)}, "
                f"device={self.x_train.device})")


def _check_fraction(test_fraction):
    if not isinstance(test_fraction, (int, float)) or not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be a number strictly between 0 and 1, got {test_fraction!r}.")


def standardize_pixels(x_train, x_test):
    """Subtract the training mean and divide by the training std, pixel by pixel.

    Pixels that are constant in the training set (std 0, e.g. some corners) are only
    centered: their std is replaced by 1 so nothing is divided by zero.
    x_train: (N_train, D), x_test: (N_test, D) -> (x_train, x_test, mean (D,), std (D,))
    """
    mean = x_train.mean(axis=0)
    std = x_train.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    return (x_train - mean) / std, (x_test - mean) / std, mean, std


def load_digits_split(test_fraction=0.25, seed=0, device=None, n_train=None):
    """The digits, split into a training and a test set, standardized, as tensors.

    The split is stratified (every class in the same proportion in both parts) and is a
    function of ``seed`` only. Returns a ``DigitsSplit`` on ``device`` (default: CPU).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    _check_fraction(test_fraction)
    digits = load_digits()
    x, y = digits.data.astype(np.float64), digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y)
    if n_train is not None:
        if not isinstance(n_train, int) or not N_CLASSES <= n_train <= len(y_train):
            raise ValueError(f"n_train must be an integer between {N_CLASSES} and {len(y_train)} "
                             f"(the size of the training part), got {n_train!r}.")
        if n_train < len(y_train):
            x_train, _, y_train, _ = train_test_split(
                x_train, y_train, train_size=n_train, random_state=seed, stratify=y_train)
    x_train, x_test, mean, std = standardize_pixels(x_train, x_test)
    split = DigitsSplit(
        x_train=torch.tensor(x_train, dtype=torch.float32),
        y_train=torch.tensor(y_train, dtype=torch.int64),
        x_test=torch.tensor(x_test, dtype=torch.float32),
        y_test=torch.tensor(y_test, dtype=torch.int64),
        mean=torch.tensor(mean, dtype=torch.float32),
        std=torch.tensor(std, dtype=torch.float32),
    )
    return split.to(device) if device is not None else split


def check_class_labels(y, n_classes=None, n=None, outputs=None):
    """y must be class labels, as F.cross_entropy expects: a 1-D int64 tensor with values in
    0..n_classes-1 (0 or more when ``n_classes`` is None) and, when ``n`` is given, n of them.

    ``outputs`` names what has the n_classes outputs, for the message (e.g. "the model").
    """
    if not isinstance(y, torch.Tensor) or y.dtype != torch.int64 or y.dim() != 1:
        raise TypeError(f"y must be a 1-D int64 tensor of class labels (what F.cross_entropy expects), got "
                        f"{type(y).__name__ if not isinstance(y, torch.Tensor) else 'dtype ' + str(y.dtype)} "
                        f"of shape {tuple(getattr(y, 'shape', ()))}. Convert it first, e.g. y.long().")
    if n is not None and y.shape[0] != n:
        raise ValueError(f"y must hold {n} class labels (one per row of x), got {y.shape[0]}.")
    if y.numel() == 0:
        return
    low, high = int(y.min()), int(y.max())
    if n_classes is None and low < 0:
        raise ValueError(f"labels must be >= 0, got values from {low} to {high}.")
    if n_classes is not None and (low < 0 or high >= n_classes):
        why = f"n_classes={n_classes}" if outputs is None else f"{outputs} has {n_classes} outputs"
        raise ValueError(f"labels must lie in 0..{n_classes - 1} ({why}), got values from {low} to {high}.")


def batches(x, y, batch_size, seed=0):
    """Endless minibatches (x[idx], y[idx]), reshuffled every epoch by a seeded generator.

    x: (N, ...), y: (N,). Every batch has exactly ``batch_size`` rows; the last,
    incomplete batch of an epoch is dropped.
    """
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise TypeError(f"x must be a torch.Tensor of shape (N, ...), got "
                        f"{type(x).__name__ if not isinstance(x, torch.Tensor) else 'a 0-D tensor'}.")
    check_class_labels(y)
    n = int(x.shape[0])
    if int(y.shape[0]) != n:
        raise ValueError(f"x and y must have the same number of rows, got {n} and {int(y.shape[0])}.")
    if not isinstance(batch_size, int) or not 1 <= batch_size <= n:
        raise ValueError(f"batch_size must be an integer between 1 and the number of examples ({n}), "
                         f"got {batch_size!r}.")
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(n, generator=generator).to(x.device)
        for start in range(0, n - batch_size + 1, batch_size):
            idx = order[start:start + batch_size]
            yield x[idx], y[idx]

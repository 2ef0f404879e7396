"""scikit-learn's bundled digits data (8x8 images, 10 classes), split and scaled once.

The split and scaling are those of the calibrated scenarios: 1437 training and
360 test images, stratified with ``random_state=0``, standardized with the
training split's statistics. Nothing is downloaded.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor
from torch.utils.data import TensorDataset

__all__ = [
    "digits",
]


def _sklearn() -> tuple[object, object, object]:
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
        from sklearn.preprocessing import StandardScaler
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "The demo trains on scikit-learn's bundled digits data: "
            "pip install 'lightning_gradguard[demo]' (or pip install scikit-learn)."
        ) from error
    return load_digits, train_test_split, StandardScaler


@functools.lru_cache(maxsize=1)
def digits() -> tuple[TensorDataset, tuple[Tensor, Tensor]]:
    """The training set as a ``TensorDataset`` and the test set as ``(x, y)``.

    Example:
        >>> train, (x_test, y_test) = digits()
        >>> len(train), tuple(x_test.shape), int(y_test.max())
        (1437, (360, 64), 9)
    """
    load_digits, train_test_split, standard_scaler = _sklearn()
    x, y = load_digits(return_X_y=True)  # type: ignore[operator]
    x_train, x_test, y_train, y_test = train_test_split(  # type: ignore[operator]
        x, y, test_size=0.2, random_state=0, stratify=y
    )
    scaler = standard_scaler().fit(x_train)  # type: ignore[operator]

    def features(values: object) -> Tensor:
        return torch.tensor(scaler.transform(values), dtype=torch.float32)

    def labels(values: object) -> Tensor:
        return torch.tensor(values, dtype=torch.long)

    return TensorDataset(features(x_train), labels(y_train)), (features(x_test), labels(y_test))

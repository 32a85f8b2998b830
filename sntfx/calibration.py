"""Calibration data from a dataset, for post-training quantization.

:class:`CalibrationReader` implements ONNX Runtime's ``CalibrationDataReader``
protocol (``get_next()`` returns a feed dict, then ``None``; ``rewind()``) over
seeded, un-augmented batches of a dataset's training split, so the int8
export and the simulated quantization passes calibrate on the same images.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from torch.utils.data import Dataset

from .data import fixed_batches

__all__ = ["CalibrationReader", "calibration_batches"]


def calibration_batches(dataset: Dataset, *, batches: int = 16, batch_size: int = 32, seed: int = 0):
    """``batches`` seeded training batches ``(x, y)`` without augmentation."""
    return fixed_batches(dataset, batches=batches, batch_size=batch_size, seed=seed)


class CalibrationReader:
    """ONNX Runtime calibration data reader over a dataset.

    Example::

        reader = CalibrationReader(data.train, input_name="input", batches=16)
        onnxruntime.quantization.quantize_static(fp32_path, int8_path, reader, ...)
    """

    def __init__(self, dataset: Dataset, input_name: str, *, batches: int = 16, batch_size: int = 32, seed: int = 0,
                 fixed_batch: int | None = None):
        size = fixed_batch or batch_size
        self.input_name = input_name
        self._batches = [x.numpy().astype(np.float32)
                         for x, _ in calibration_batches(dataset, batches=batches, batch_size=size, seed=seed)
                         if len(x) == size]
        self._it: Iterator | None = None

    def __len__(self) -> int:
        return len(self._batches)

    def get_next(self):
        if self._it is None:
            self._it = iter(self._batches)
        x = next(self._it, None)
        return None if x is None else {self.input_name: x}

    def rewind(self) -> None:
        self._it = None

"""An example model file for `sntfx transform examples/model.py --out snt.pt`.

sntfx looks for a factory named `build_model` (or `model`, `get_model`, or the
name given with --entry) and, optionally, `example_inputs()` for the input shape.
"""

import torch
from torch import nn


class TinyNet(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.block = nn.Sequential(
            nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False),  # depthwise
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 32, 1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(),
        )
        self.head = nn.Linear(32, num_classes)

    def forward(self, x):
        return self.head(self.block(self.stem(x)).mean((2, 3)))


def build_model(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """``sntfx transform examples/model.py --data NAME`` sets both arguments from the dataset."""
    return TinyNet(num_classes, in_channels)


def example_inputs():
    return torch.randn(1, 3, 32, 32)

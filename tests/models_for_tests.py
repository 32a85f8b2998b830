"""Tiny models used across the tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ConvNet(nn.Module):
    """conv-bn-relu, a depthwise conv, a bias-free conv feeding an add, a linear head."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False, padding_mode="reflect")
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = x + self.dw(x)
        x = F.relu(self.bn2(self.conv2(x)) + x)
        return self.fc(x.mean((2, 3)))


class Tied(nn.Module):
    """One conv called twice (weight tying through reuse) and a linear sharing a weight."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.b.weight = self.a.weight

    def forward(self, x):
        x = self.conv(torch.relu(self.conv(x)))
        v = x.mean((2, 3))
        return self.a(v) + self.b(v)


class Functional(nn.Module):
    """A convolution called functionally on a raw parameter."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 3, 3, 3) * 0.1)
        self.conv = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return self.conv(F.conv2d(x, self.weight, padding=1))


class DataDependent(nn.Module):
    """Control flow on tensor values: untraceable by torch.fx."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        if x.sum() > 0:
            return self.conv(x)
        return -self.conv(x)


class WithUntraceableChild(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.body = DataDependent()
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.body(self.stem(x)).mean((2, 3)))


class UntraceableRoot(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        for row in x:  # iterating over a proxy
            pass
        return self.conv(x)


class Conv1dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(2, 6, 5, padding=2, padding_mode="circular")
        self.bn = nn.BatchNorm1d(6)
        self.c2 = nn.Conv1d(6, 6, 3, stride=2, dilation=2, padding=2, groups=3, bias=False)
        self.fc = nn.Linear(6, 4, bias=False)
        self.bn_fc = nn.BatchNorm1d(4)

    def forward(self, x):
        x = torch.relu(self.bn(self.c1(x)))
        x = self.c2(x)
        return self.bn_fc(self.fc(x.mean(-1)))


class Conv3dNet(nn.Module):
    """A small video-style network: a strided, biasless 3-d stem with BatchNorm3d, a grouped replicate-padded
    conv, an anisotropic dilated 'same' conv, pooled into a Linear."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv3d(2, 6, (3, 3, 2), stride=(1, 2, 1), padding=(1, 1, 0), bias=False)
        self.bn = nn.BatchNorm3d(6)
        self.c2 = nn.Conv3d(6, 6, 3, padding=1, groups=3, padding_mode="replicate")
        self.c3 = nn.Conv3d(6, 4, (1, 3, 3), dilation=(1, 2, 1), padding="same")
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = torch.relu(self.bn(self.c1(x)))
        x = x + torch.relu(self.c2(x))
        return self.fc(self.c3(x).mean((2, 3, 4)))


class Tokens(nn.Module):
    """A bias-free Linear on (N, T, C) tokens, T == C, then BatchNorm1d over T: not a bias sink."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(6, 6, bias=False)
        self.bn = nn.BatchNorm1d(6)
        self.out = nn.Linear(6, 2)

    def forward(self, x):
        return self.out(self.bn(self.proj(x)))

"""Small built-in models (``sntfx:NAME``), for the demo, the studies and tests.

* ``cnn``: a compact VGG-style CNN for small images (8x8 digits, 28x28
  Fashion-MNIST, 32x32 CIFAR): three conv-BN-ReLU stages and a linear head.
* ``resnet20`` / ``resnet32`` / ``resnet56``: the CIFAR ResNets of He et al.
  (3 stages of basic blocks, 16/32/64 channels, option-B 1x1 shortcuts).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

__all__ = ["BUILTIN_MODELS", "SmallCNN", "CifarResNet", "default_input_shape"]


class SmallCNN(nn.Module):
    """conv-BN-ReLU x 3 (the last two strided) -> global average pool -> linear."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1, bias=False),
            nn.BatchNorm2d(w),
            nn.ReLU(inplace=True),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(2 * w),
            nn.ReLU(inplace=True),
            nn.Conv2d(2 * w, 2 * w, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(2 * w),
            nn.ReLU(inplace=True),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(2 * w, num_classes)

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)).flatten(1))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs."""

    def __init__(self, depth: int = 20, in_channels: int = 3, num_classes: int = 10, width: int = 16):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        layers, cin = [], width
        for stage, mult in enumerate((1, 2, 4)):
            cout = width * mult
            blocks = [BasicBlock(cin if i == 0 else cout, cout, 2 if (i == 0 and stage > 0) else 1) for i in range(n)]
            layers.append(nn.Sequential(*blocks))
            cin = cout
        self.layer1, self.layer2, self.layer3 = layers
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.pool(x).flatten(1))


def _resnet(depth: int) -> Callable[..., nn.Module]:
    def build(**kwargs) -> nn.Module:
        return CifarResNet(depth, **kwargs)

    build.__name__ = f"resnet{depth}"
    return build


BUILTIN_MODELS: dict[str, Callable[..., nn.Module]] = {
    "cnn": SmallCNN,
    "resnet20": _resnet(20),
    "resnet32": _resnet(32),
    "resnet56": _resnet(56),
}


def default_input_shape(name: str, kwargs: dict) -> tuple[int, ...]:
    channels = kwargs.get("in_channels", 1 if name == "cnn" else 3)
    size = 28 if name == "cnn" else 32
    return (1, channels, size, size)

"""Small built-in models (``sntfx:NAME``), for the demo, the studies and tests.

* ``cnn``: a compact VGG-style CNN for small images (8x8 digits, 28x28
  Fashion-MNIST, 32x32 CIFAR): three conv-BN-ReLU stages and a linear head.
* ``smallvgg``: four 3x3 conv-BN-ReLU layers in two max-pooled stages and a
  two-layer MLP head (218k parameters at width 16); about 90% on Fashion-MNIST
  after 4 epochs of Adam, at ~5,000 training images/s on 2 CPU cores. The
  default model of ``sntfx study --preset quick``.
* ``resnet8`` / ``resnet20`` / ``resnet32`` / ``resnet56``: the CIFAR ResNets of
  He et al. (3 stages of basic blocks, 16/32/64 channels, option-B 1x1
  shortcuts). ``resnet8`` (one block per stage, 78k parameters) is the residual
  network the Fashion-MNIST research confirms on: an epoch costs about 1.4x
  smallvgg's on one CPU thread, against about 5x for ``resnet20``.
* ``vgg11`` / ``vgg16``: CIFAR VGGs with BatchNorm, global pooling and one
  linear classifier.
* ``mobilenetv2``: torchvision's MobileNetV2 with the CIFAR strides (stem and
  second stage at stride 1, so 32x32 inputs end at 4x4).
* ``vit``: a small Vision Transformer for 32x32 inputs (patch 4, 6 layers,
  width 192, 3 heads), built from torchvision's ``VisionTransformer``.

Every model takes ``in_channels`` and ``num_classes``; ``smallvgg`` and ``vit``
also take ``image_size`` (``sntfx study`` and ``sntfx train`` set all three from
the dataset).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

__all__ = ["BUILTIN_MODELS", "SmallCNN", "SmallVGG", "CifarResNet", "CifarVGG", "default_input_shape"]


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


class SmallVGG(nn.Module):
    """[conv-BN-ReLU x 2, max-pool] x 2 -> flatten -> linear-ReLU -> linear."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 16, hidden: int = 128,
                 image_size: int | tuple[int, int] = 28):
        super().__init__()
        h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if h < 4 or w < 4:
            raise ValueError(f"SmallVGG needs images of at least 4x4 (two 2x2 max-pools), got {h}x{w}")

        def conv(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(*conv(in_channels, width), *conv(width, width), nn.MaxPool2d(2),
                                      *conv(width, 2 * width), *conv(2 * width, 2 * width), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Linear(2 * width * (h // 4) * (w // 4), hidden), nn.ReLU(inplace=True),
                                        nn.Linear(hidden, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


_VGG_CONFIGS = {
    "vgg11": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg16": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
}


class CifarVGG(nn.Module):
    """VGG with BatchNorm for small images: conv stages, global average pool, one linear layer."""

    def __init__(self, config: str = "vgg16", in_channels: int = 3, num_classes: int = 10):
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_channels
        for v in _VGG_CONFIGS[config]:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(cin, v, 3, padding=1, bias=False), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                cin = v
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)).flatten(1))


def _vgg(config: str) -> Callable[..., nn.Module]:
    def build(**kwargs) -> nn.Module:
        return CifarVGG(config, **kwargs)

    build.__name__ = config
    return build


def mobilenetv2(in_channels: int = 3, num_classes: int = 10, width_mult: float = 1.0) -> nn.Module:
    """MobileNetV2 with the CIFAR strides: stem and the 24-channel stage at stride 1."""
    from torchvision.models import MobileNetV2

    setting = [[1, 16, 1, 1], [6, 24, 2, 1], [6, 32, 3, 2], [6, 64, 4, 2], [6, 96, 3, 1], [6, 160, 3, 2],
               [6, 320, 1, 1]]
    model = MobileNetV2(num_classes=num_classes, width_mult=width_mult, inverted_residual_setting=setting)
    stem = model.features[0][0]
    model.features[0][0] = nn.Conv2d(in_channels, stem.out_channels, 3, stride=1, padding=1, bias=False)
    return model


def vit(in_channels: int = 3, num_classes: int = 10, image_size: int = 32, patch_size: int = 4,
        num_layers: int = 6, hidden_dim: int = 192, num_heads: int = 3, mlp_dim: int = 768) -> nn.Module:
    """A small ViT (torchvision's implementation) for 32x32 images."""
    from torchvision.models import VisionTransformer

    model = VisionTransformer(image_size=image_size, patch_size=patch_size, num_layers=num_layers,
                              num_heads=num_heads, hidden_dim=hidden_dim, mlp_dim=mlp_dim, num_classes=num_classes)
    if in_channels != 3:
        model.conv_proj = nn.Conv2d(in_channels, hidden_dim, patch_size, stride=patch_size)
    return model


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
    "smallvgg": SmallVGG,
    "resnet8": _resnet(8),
    "resnet20": _resnet(20),
    "resnet32": _resnet(32),
    "resnet56": _resnet(56),
    "vgg11": _vgg("vgg11"),
    "vgg16": _vgg("vgg16"),
    "mobilenetv2": mobilenetv2,
    "vit": vit,
}


def accepts(name: str, argument: str) -> bool:
    """Whether the built-in model ``name`` takes keyword ``argument``."""
    import inspect

    factory = BUILTIN_MODELS[name]
    target = factory.__init__ if isinstance(factory, type) else factory
    params = inspect.signature(target).parameters
    return argument in params


def default_input_shape(name: str, kwargs: dict) -> tuple[int, ...]:
    channels = kwargs.get("in_channels", 1 if name in ("cnn", "smallvgg") else 3)
    size = kwargs.get("image_size", 28 if name in ("cnn", "smallvgg") else 32)
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return (1, channels, h, w)

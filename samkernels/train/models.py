"""The papers' architectures, written in plain PyTorch (no torchvision needed).

* ``mlp``          - ReLU multilayer perceptron; hidden sizes from ``hidden`` (784-500-300 in the bSAM
                     paper's MNIST runs);
* ``lenet5``       - LeNet-5 with ReLU (bSAM, FashionMNIST);
* ``resnet20-frn`` - ResNet-20 with filter response normalisation + TLU instead of BatchNorm, as in
                     Izmailov et al. (2021) and the bSAM paper (0.27 M parameters on CIFAR-10);
* ``resnet56``     - CIFAR ResNet-56 (He et al. 2016) with BatchNorm, projection shortcuts (BiSAM);
* ``wrn28-K``      - Wide-ResNet-28-K (Zagoruyko & Komodakis 2016), pre-activation, no dropout (BiSAM,
                     VSAM), e.g. ``wrn28-10``;
* ``vgg19-bn``     - VGG-19 with BatchNorm and a single linear classifier (the usual CIFAR variant).
"""
from __future__ import annotations

import math
import re
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from samkernels.train.config import ConfigError

MODELS = ("mlp", "lenet5", "resnet20-frn", "resnet56", "wrn28-K", "vgg19-bn")


def build_model(name: str, input_shape: Tuple[int, ...], num_classes: int,
                hidden: Optional[Sequence[int]] = None) -> nn.Module:
    key = name.lower().replace("_", "-")
    if key == "mlp":
        return MLP(math.prod(input_shape), hidden if hidden is not None else (256, 256), num_classes)
    wrn = re.fullmatch(r"wrn-?28-(\d+)", key)
    builders = {
        "lenet5": lambda c: LeNet5(input_shape, num_classes),
        "resnet20-frn": lambda c: CifarResNet(20, c, num_classes, norm="frn"),
        "resnet56": lambda c: CifarResNet(56, c, num_classes, norm="bn"),
        "vgg19-bn": lambda c: VGG19BN(c, num_classes),
    }
    if wrn:
        builders[key] = lambda c: WideResNet(28, int(wrn.group(1)), c, num_classes)
    if key not in builders:
        raise ConfigError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    if len(input_shape) != 3:
        raise ConfigError(f"model {name!r} needs image inputs (C, H, W); this data set has "
                          f"shape {input_shape}: use --model mlp")
    try:
        return builders[key](input_shape[0])
    except RuntimeError as err:  # e.g. LeNet-5's 5x5 convolutions on 8x8 digits
        raise ConfigError(f"model {name!r} does not fit inputs of shape {input_shape}: {err}") from err


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


class MLP(nn.Sequential):
    def __init__(self, in_features: int, hidden: Sequence[int], num_classes: int):
        layers, width = [nn.Flatten()], in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        super().__init__(*layers)


class LeNet5(nn.Module):
    """conv5(6) - pool - conv5(16) - pool - 120 - 84 - K, ReLU; 28x28 inputs are padded by 2 so that
    the feature map is 16x5x5 as for 32x32 inputs."""

    def __init__(self, input_shape: Tuple[int, int, int], num_classes: int):
        super().__init__()
        c, h, _ = input_shape
        self.features = nn.Sequential(
            nn.Conv2d(c, 6, 5, padding=2 if h < 32 else 0), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten())
        with torch.no_grad():
            flat = self.features(torch.zeros(1, *input_shape)).shape[1]
        self.classifier = nn.Sequential(nn.Linear(flat, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(),
                                        nn.Linear(84, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


class FRN(nn.Module):
    """Filter response normalisation with thresholded linear unit (Singh & Krishnan 2020):
    ``max(gamma * x / sqrt(mean_hw(x^2) + eps) + beta, tau)``; no batch statistics at all."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        shape = (1, channels, 1, 1)
        self.gamma = nn.Parameter(torch.ones(shape))
        self.beta = nn.Parameter(torch.zeros(shape))
        self.tau = nn.Parameter(torch.zeros(shape))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        nu2 = x.square().mean(dim=(2, 3), keepdim=True)
        x = x * torch.rsqrt(nu2 + self.eps)
        return torch.maximum(self.gamma * x + self.beta, self.tau)


def _norm(kind: str, channels: int) -> nn.Module:
    return FRN(channels) if kind == "frn" else nn.BatchNorm2d(channels)


def _stages(widths, n: int, block) -> Tuple[nn.Sequential, int]:
    """The residual stages from 16 channels: ``n`` blocks ``block(cin, cout, stride)`` per width;
    the first block of every stage after the first halves the resolution.  Returns them and the
    last width."""
    blocks, cin = [], 16
    for stage, cout in enumerate(widths):
        for i in range(n):
            blocks.append(block(cin, cout, 2 if stage > 0 and i == 0 else 1))
            cin = cout
    return nn.Sequential(*blocks), cin


def _init_convs(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


class _BasicBlock(nn.Module):
    """conv-norm-relu-conv-norm (+ shortcut) - relu; a 1x1 conv + norm shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int, norm: str):
        super().__init__()
        bias = norm == "frn"  # the FRN network (Izmailov et al.) uses conv biases, BN makes them moot
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=bias)
        self.n1 = _norm(norm, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=bias)
        self.n2 = _norm(norm, cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=bias), _norm(norm, cout))

    def forward(self, x: Tensor) -> Tensor:
        y = torch.relu(self.n1(self.conv1(x)))
        y = self.n2(self.conv2(y))
        return torch.relu(y + self.shortcut(x))


class CifarResNet(nn.Module):
    """He et al.'s CIFAR ResNet of depth 6n+2: 16/32/64 channels, n basic blocks per stage."""

    def __init__(self, depth: int, in_channels: int, num_classes: int, norm: str = "bn"):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError("CIFAR ResNet depth must be 6n+2")
        n = (depth - 2) // 6
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 16, 3, 1, 1, bias=norm == "frn"),
                                  _norm(norm, 16), nn.ReLU())
        self.blocks, _ = _stages(
            (16, 32, 64), n, lambda cin, cout, stride: _BasicBlock(cin, cout, stride, norm))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes))
        _init_convs(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(self.stem(x)))


class _WideBlock(nn.Module):
    """Pre-activation block: bn-relu-conv-bn-relu-conv (+ shortcut)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        a = torch.relu(self.bn1(x))
        y = self.conv2(torch.relu(self.bn2(self.conv1(a))))
        return y + (x if self.shortcut is None else self.shortcut(a))


class WideResNet(nn.Module):
    def __init__(self, depth: int, width: int, in_channels: int, num_classes: int):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError("Wide-ResNet depth must be 6n+4")
        n = (depth - 4) // 6
        widths = (16 * width, 32 * width, 64 * width)
        self.stem = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.blocks, cin = _stages(widths, n, _WideBlock)
        self.head = nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                  nn.Flatten(), nn.Linear(cin, num_classes))
        _init_convs(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(self.stem(x)))


class VGG19BN(nn.Module):
    CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
           512, 512, 512, 512, "M")

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        layers, cin = [], in_channels
        for v in self.CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(cin, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU()]
                cin = v
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(512, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


def model_name(model: str, hidden) -> str:
    """``mlp-256-256`` for MLPs, the architecture name otherwise."""
    return model + ("-" + "-".join(map(str, hidden)) if model == "mlp" and hidden else "")

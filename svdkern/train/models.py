"""Models of `svdkern train`: an MLP and a small CNN for 8×8 digits, CIFAR ResNets.

Every model names its final classifier `fc`; the pipeline decomposes every other
Linear/Conv2d (the authors decompose every conv — first, stride-2 and 1×1
shortcut convs — but not the final Linear).

ResNet-20/32/56/110 are He et al.'s CIFAR networks (3 stages of 16/32/64 channels,
n = (depth − 2)/6 BasicBlocks each, option-A shortcuts: stride-2 subsampling and
zero channel padding, no parameters). ResNet-18 is the usual CIFAR variant
(3×3 stem, stages of 64/128/256/512 channels, 1×1-conv shortcuts).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CLASSIFIER", "build_model"]

CLASSIFIER = "fc"


class MLP(nn.Module):
    """Flatten → Linear(in, h) → ReLU → Linear(h, h) → ReLU → fc Linear(h, classes)."""

    def __init__(self, in_shape: tuple[int, ...], num_classes: int, hidden: int = 256) -> None:
        super().__init__()
        features = 1
        for d in in_shape:
            features *= d
        self.fc1 = nn.Linear(features, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc(F.relu(self.fc2(x)))


def _conv_bn(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()
    )


class SmallCNN(nn.Module):
    """Four 3×3 conv-BN-ReLU (w, 2w | pool | 4w, 4w | pool) → global average → fc.

    With the default w = 16 on 8×8 digits (8×8 → 4×4 → 2×2): 61 k parameters, 1.19 M MACs.
    """

    def __init__(self, in_shape: tuple[int, ...], num_classes: int, width: int = 16) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            _conv_bn(in_shape[0], w),
            _conv_bn(w, 2 * w),
            nn.MaxPool2d(2),
            _conv_bn(2 * w, 4 * w),
            _conv_bn(4 * w, 4 * w),
            nn.MaxPool2d(2),
        )
        self.fc = nn.Linear(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean(dim=(2, 3)))


class _PadShortcut(nn.Module):
    """Option-A shortcut: subsample by 2 and zero-pad the channels to `planes`."""

    def __init__(self, planes: int) -> None:
        super().__init__()
        self.planes = planes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::2, ::2]
        extra = self.planes - x.shape[1]
        return F.pad(x, (0, 0, 0, 0, extra // 2, extra - extra // 2))


class BasicBlock(nn.Module):
    """conv3×3-BN-ReLU-conv3×3-BN + shortcut, ReLU."""

    def __init__(self, c_in: int, planes: int, stride: int = 1, option: str = "A") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != planes:
            if option == "A":
                self.shortcut = _PadShortcut(planes)
            else:
                self.shortcut = nn.Sequential(
                    nn.Conv2d(c_in, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
                )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR ResNet: 3×3 stem, stages of BasicBlocks, global average pool, fc."""

    def __init__(
        self,
        blocks: list[int],
        widths: list[int],
        in_channels: int,
        num_classes: int,
        option: str,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        layers = []
        c_in = widths[0]
        for i, (n, planes) in enumerate(zip(blocks, widths, strict=True)):
            stage = []
            for j in range(n):
                stride = 2 if i > 0 and j == 0 else 1
                stage.append(BasicBlock(c_in, planes, stride, option))
                c_in = planes
            layers.append(nn.Sequential(*stage))
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(c_in, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        return self.fc(self.layers(x).mean(dim=(2, 3)))


def build_model(name: str, in_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """A fresh model by name: mlp, cnn, resnet20/32/56/110, resnet18."""
    if name == "mlp":
        return MLP(in_shape, num_classes)
    if name == "cnn":
        return SmallCNN(in_shape, num_classes)
    if name in ("resnet20", "resnet32", "resnet56", "resnet110"):
        n = (int(name[6:]) - 2) // 6
        return ResNet([n, n, n], [16, 32, 64], in_shape[0], num_classes, option="A")
    if name == "resnet18":
        return ResNet([2, 2, 2, 2], [64, 128, 256, 512], in_shape[0], num_classes, option="B")
    raise ValueError(
        f"unknown model {name!r}; expected mlp, cnn, resnet20, resnet32, resnet56, resnet110 "
        "or resnet18"
    )

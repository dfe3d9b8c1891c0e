"""Pieces shared by the model families: the small conv backbone."""

from __future__ import annotations

import torch
from torch import nn


def conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SmallCNN(nn.Module):
    """conv16 -> pool -> conv32 -> pool -> [attention at 1/4 resolution] -> conv64 -> pool -> GAP -> FC.

    Global average pooling keeps the network valid for any input size, so H and W can be dynamic
    axes in the exported graph.
    """

    def __init__(self, num_classes: int = 10, mid: nn.Module | None = None, widths=(16, 32, 64),
                 in_chans: int = 1) -> None:
        super().__init__()
        c1, c2, c3 = widths
        self.stem = nn.Sequential(conv_bn_relu(in_chans, c1), nn.MaxPool2d(2), conv_bn_relu(c1, c2), nn.MaxPool2d(2))
        self.mid = mid if mid is not None else nn.Identity()
        self.head = nn.Sequential(conv_bn_relu(c2, c3), nn.MaxPool2d(2), conv_bn_relu(c3, c3))
        self.fc = nn.Linear(c3, num_classes)
        self.out_channels = c3

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.mid(self.stem(x)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.fc(self.features(x).mean(dim=(2, 3))),)

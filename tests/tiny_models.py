"""Tiny networks with awkward topology, shared by the core tests."""
import torch
from torch import nn


class Branchy(nn.Module):
    """Declared out of execution order, with a branch, a concat, a residual add, grouped and depthwise convs."""

    def __init__(self, num_classes: int = 5):
        super().__init__()
        self.head = nn.Linear(24, num_classes)  # declared first, runs last
        self.right = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.left = nn.Conv2d(8, 16, 1)
        self.depthwise = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.stem(x)))
        r = torch.relu(self.right(x)) + x
        left = self.depthwise(torch.relu(self.left(x)))
        y = torch.cat([left, r], dim=1).mean(dim=(2, 3))
        return self.head(y)


class NoPrunable(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x):
        return self.bn(x)


class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.act = nn.ReLU()
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)

    def forward(self, x):
        return x + self.conv2(self.act(self.conv1(x)))


class UntraceableResNet(nn.Module):
    """A small residual CNN whose forward branches on a traced shape, as transformers' models do."""

    def __init__(self, shared_block: bool = False, tied: bool = False, in_place: bool = False):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.ModuleList([Block(8) for _ in range(3)])
        if shared_block:
            self.blocks[2] = self.blocks[0]  # one module called twice
        self.early = nn.Linear(8, 8)
        self.late = nn.Linear(8, 8)
        if tied:
            self.late.weight = self.early.weight  # a later layer shares the earlier one's weight
        self.head = nn.Linear(8, 10)
        self.in_place = in_place

    def forward(self, x):
        h = self.stem(x)
        if h.shape[1] != 8:  # fx cannot trace this
            raise ValueError("unexpected width")
        for block in self.blocks:
            h = block(h)
            if self.in_place:
                h.mul_(0.5)  # changes the block's own output tensor after it returned
        v = self.early(h.mean((2, 3)))
        return self.head(torch.relu(self.late(v)))


class DepthwiseConcat(nn.Module):
    """A depthwise conv inside a group, and two groups joined by a concatenation into the head."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.b = nn.Conv2d(3, 6, 1)
        self.mix = nn.Conv2d(14, 10, 1)
        self.head = nn.Linear(10 * 4 * 4, 5)

    def forward(self, x):
        a = torch.relu(self.dw(torch.relu(self.bn_a(self.a(x)))))
        y = torch.relu(self.mix(torch.cat([a, torch.relu(self.b(x))], dim=1)))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 4), 1))


def lived_in(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics and shifts, so that a masked channel's BN shift would show if it leaked."""
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.normal_(1, 0.2)
            m.bias.data.normal_(0, 0.3)
    return model.eval()

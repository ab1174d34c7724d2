"""Feature extractors. Each maps images to a feature vector of size ``out_dim``.

``forward(x)`` returns ``{"features": (B, out_dim), "maps": [stage outputs]}``; the stage maps are
what PODNet, LwM and SPB-I need (the last one is the pre-pooling map), and they cost nothing extra.
``last_relu=False`` drops the ReLU at the end of the last block (UCIR/PODNet's signed embedding).

The ResNets take four more options (``RESNET_OPTIONS``; the defaults are He et al.'s network and
change nothing): ``block_relu=False`` drops the ReLU after every residual block, ``stage_relu=False``
only the one after the last block of each stage, ``zero_residual=True`` starts the last BatchNorm
scale of every block at 0 (each block is then the identity on its shortcut path), and
``penultimate_map=True`` adds the output of the last stage's penultimate block to ``maps``, before
the final map. These are the official PODNet networks' settings (docs/methods/podnet.md).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn


def stage_outputs(stages: nn.ModuleList, x: torch.Tensor) -> dict:
    """Run ``x`` through the stages: the globally pooled last map is the feature vector, every
    stage's output is kept in ``maps``."""
    maps = []
    for stage in stages:
        x = stage(x)
        maps.append(x)
    return {"features": torch.flatten(F.adaptive_avg_pool2d(x, 1), 1), "maps": maps}


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (He et al., 2016)."""

    def __init__(self, cin: int, cout: int, stride: int, shortcut: str, relu: bool = True):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = relu
        self.pad_channels = 0
        self.stride = stride
        self.down: nn.Module | None = None
        if stride != 1 or cin != cout:
            if shortcut == "A":  # parameter-free: subsample and zero-pad channels (CIFAR ResNets)
                self.pad_channels = cout - cin
            else:
                self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def _shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.down is not None:
            return self.down(x)
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.pad_channels:
            x = F.pad(x, (0, 0, 0, 0, 0, self.pad_channels))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out)) + self._shortcut(x)
        return F.relu(out) if self.relu else out


RESNET_OPTIONS = {"block_relu": True, "stage_relu": True, "zero_residual": False, "penultimate_map": False}
RESIDUAL_BACKBONES = ("resnet32", "resnet18", "resnet18_cifar")  # the backbones that take RESNET_OPTIONS


class ResNet(nn.Module):
    """A ResNet of basic blocks: a stem, stages of blocks, global average pooling.

    A block is followed by a ReLU when ``block_relu``, and, for the last block of a stage, also
    ``stage_relu``, and, for the network's last block, also ``last_relu``. ``zero_residual`` sets the
    scale of every block's second BatchNorm to 0 (Goyal et al.'s zero-init residual). With
    ``penultimate_map`` the maps are the stage outputs with, before the last, the output of the last
    stage's penultimate block.
    """

    def __init__(
        self,
        in_channels: int,
        widths: Sequence[int],
        blocks: Sequence[int],
        stem: str,
        shortcut: str,
        last_relu: bool = True,
        block_relu: bool = True,
        stage_relu: bool = True,
        zero_residual: bool = False,
        penultimate_map: bool = False,
    ):
        super().__init__()
        if penultimate_map and blocks[-1] < 2:
            raise ValueError("penultimate_map needs at least 2 blocks in the last stage")
        self.penultimate_map = penultimate_map
        w0 = widths[0]
        if stem == "imagenet":
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, w0, 7, 2, 3, bias=False), nn.BatchNorm2d(w0), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)
            )
        else:
            self.stem = nn.Sequential(nn.Conv2d(in_channels, w0, 3, 1, 1, bias=False), nn.BatchNorm2d(w0), nn.ReLU(inplace=True))
        stages = []
        cin = w0
        for i, (w, n) in enumerate(zip(widths, blocks)):
            layers = []
            for j in range(n):
                stage_end = j == n - 1
                last = i == len(widths) - 1 and stage_end
                relu = block_relu and (stage_relu or not stage_end) and (last_relu or not last)
                layers.append(BasicBlock(cin, w, 2 if (j == 0 and i > 0) else 1, shortcut, relu=relu))
                cin = w
            stages.append(nn.Sequential(*layers))
        self.stages = nn.ModuleList(stages)
        self.out_dim = cin
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if zero_residual:  # no random draw: the other weights are those of the same seed without it
            for m in self.modules():
                if isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def forward(self, x: torch.Tensor) -> dict:
        if not self.penultimate_map:
            return stage_outputs(self.stages, self.stem(x))
        x, maps = self.stem(x), []
        for stage in self.stages[:-1]:
            x = stage(x)
            maps.append(x)
        last = self.stages[-1]
        for block in last[:-1]:
            x = block(x)
        maps.append(x)
        x = last[-1](x)
        maps.append(x)
        return {"features": torch.flatten(F.adaptive_avg_pool2d(x, 1), 1), "maps": maps}


class ConvNet(nn.Module):
    """A small 3-layer convnet for 8x8 to 32x32 inputs (digits, MNIST, Fashion-MNIST)."""

    def __init__(self, in_channels: int, widths: Sequence[int] = (32, 64, 128), last_relu: bool = True):
        super().__init__()
        layers, cin = [], in_channels
        for i, w in enumerate(widths):
            relu = [nn.ReLU(inplace=True)] if last_relu or i < len(widths) - 1 else []
            layers.append(nn.Sequential(nn.Conv2d(cin, w, 3, 1 if i == 0 else 2, 1, bias=False), nn.BatchNorm2d(w), *relu))
            cin = w
        self.stages = nn.ModuleList(layers)
        self.out_dim = cin

    def forward(self, x: torch.Tensor) -> dict:
        return stage_outputs(self.stages, x)


class MLP(nn.Module):
    """Flatten, then Linear+ReLU layers of the given widths."""

    def __init__(self, in_shape: Sequence[int], hidden: Sequence[int] = (256, 256), last_relu: bool = True):
        super().__init__()
        dims = [int(torch.tensor(in_shape).prod())] + list(hidden)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(dims))
        self.out_dim = dims[-1]
        self.last_relu = last_relu

    def forward(self, x: torch.Tensor) -> dict:
        x = torch.flatten(x, 1)
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if self.last_relu or i < len(self.layers) - 1:
                x = F.relu(x)
        return {"features": x, "maps": []}


def resnet32(in_channels: int = 3, last_relu: bool = True, **options) -> ResNet:
    """CIFAR ResNet-32 (3 stages of 5 blocks, 16/32/64 channels, 64-d features, shortcut A);
    ``options``: ``RESNET_OPTIONS``."""
    return ResNet(in_channels, (16, 32, 64), (5, 5, 5), stem="cifar", shortcut="A", last_relu=last_relu, **options)


def resnet18(in_channels: int = 3, last_relu: bool = True, stem: str = "imagenet", **options) -> ResNet:
    """ResNet-18 (512-d); ``stem="cifar"``: 3x3 stride-1 stem without max-pool for small images;
    ``options``: ``RESNET_OPTIONS``."""
    return ResNet(in_channels, (64, 128, 256, 512), (2, 2, 2, 2), stem=stem, shortcut="B", last_relu=last_relu, **options)


def _resnet_options(kw: dict) -> dict:
    return {k: kw[k] for k in RESNET_OPTIONS if k in kw}


def _no_resnet_options(name: str, kw: dict) -> None:
    """A backbone without residual blocks cannot honour ``RESNET_OPTIONS`` other than the defaults."""
    given = [k for k, default in RESNET_OPTIONS.items() if kw.get(k, default) != default]
    if given:
        raise ValueError(f"backbone '{name}' has no residual blocks: {', '.join(given)} apply to {', '.join(RESIDUAL_BACKBONES)} only")


def _convnet(shape, **kw) -> ConvNet:
    _no_resnet_options("convnet", kw)
    return ConvNet(shape[0], kw.get("widths") or (32, 64, 128), last_relu=kw.get("last_relu", True))


def _mlp(shape, **kw) -> MLP:
    _no_resnet_options("mlp", kw)
    return MLP(shape, kw.get("hidden") or (256, 256), last_relu=kw.get("last_relu", True))


class GeneralizedBlocks(nn.Module):
    """The shallow part of a split backbone (MEMO's generalized blocks): the stem and the first stages.

    ``forward(x)`` returns ``{"map": the last of these stages' output, "maps": every one of these stages'}``.
    """

    def __init__(self, stem: nn.Module, stages: Sequence[nn.Module]):
        super().__init__()
        self.stem = stem
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> dict:
        x, maps = self.stem(x), []
        for stage in self.stages:
            x = stage(x)
            maps.append(x)
        return {"map": x, "maps": maps}


class SpecializedBlock(nn.Module):
    """The deep part of a split backbone (MEMO's specialized block): the last stages and the global
    average pooling, on the generalized map; ``forward(map)`` returns ``{"features", "maps"}``."""

    def __init__(self, stages: Sequence[nn.Module], out_dim: int):
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> dict:
        return stage_outputs(self.stages, x)


def split_backbone(backbone: nn.Module, deep: int = 1) -> tuple[GeneralizedBlocks, SpecializedBlock]:
    """Split a ResNet or the ConvNet into its shallow part (stem + all stages but the last ``deep``) and
    its deep part (the last ``deep`` stages + pooling). The parts hold the backbone's own modules, so
    ``specialized(generalized(x)["map"])`` is ``backbone(x)``. The MLP has no stages and is refused, and
    so is a ResNet built with ``penultimate_map`` (its maps do not follow the stages)."""
    if isinstance(backbone, ResNet):
        if backbone.penultimate_map:
            raise ValueError("a ResNet with penultimate_map cannot be split into stages")
        stem: nn.Module = backbone.stem
    elif isinstance(backbone, ConvNet):
        stem = nn.Identity()
    else:
        raise ValueError(f"{type(backbone).__name__} has no convolutional stages to split; use convnet or a ResNet")
    n = len(backbone.stages)
    if not 1 <= deep < n:
        raise ValueError(f"the backbone has {n} stages: the deep part takes 1 to {n - 1} of them, got {deep}")
    shallow, deep_stages = list(backbone.stages[: n - deep]), list(backbone.stages[n - deep :])
    return GeneralizedBlocks(stem, shallow), SpecializedBlock(deep_stages, backbone.out_dim)


def stage_count(name: str, widths: Sequence[int] | None = None) -> int | None:
    """Stages of backbone ``name`` (what :func:`split_backbone` can split), known before it is built;
    None for the MLP, which has none."""
    counts = {"resnet32": 3, "resnet18": 4, "resnet18_cifar": 4, "convnet": len(widths or (32, 64, 128))}
    return counts.get(name)


BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "resnet32": lambda shape, **kw: resnet32(shape[0], last_relu=kw.get("last_relu", True), **_resnet_options(kw)),
    "resnet18": lambda shape, **kw: resnet18(shape[0], last_relu=kw.get("last_relu", True), **_resnet_options(kw)),
    "resnet18_cifar": lambda shape, **kw: resnet18(shape[0], last_relu=kw.get("last_relu", True), stem="cifar", **_resnet_options(kw)),
    "convnet": _convnet,
    "mlp": _mlp,
}


def build_backbone(name: str, in_shape: Sequence[int], **kwargs) -> nn.Module:
    """Backbone ``name`` for inputs of shape (C, H, W)."""
    return BACKBONES[name](tuple(in_shape), **kwargs)

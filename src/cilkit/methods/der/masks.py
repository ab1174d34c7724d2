"""DER's channel masks (Yan, Xie, He, CVPR 2021, Sec. 3.2): m_l = sigmoid(s e_l) on the output channels
of every conv/linear layer of the newest extractor, the annealing of s, the gradient compensation,
the sparsity loss L_S and the pruning of the off channels.

Losses, options and their sources: docs/methods/der.md
"""

from __future__ import annotations

import torch
from torch import nn

from cilkit.models.backbones import MLP, ConvNet, ResNet


def anneal_s(i: int, n_batches: int, s_max: float) -> float:
    """s = 1/s_max + (s_max - 1/s_max) (b - 1)/(B - 1) for batch b = i + 1 of B (paper Sec. 3.2)."""
    if n_batches <= 1:
        return s_max
    return 1.0 / s_max + (s_max - 1.0 / s_max) * i / (n_batches - 1)


class _CompensatedSigmoid(torch.autograd.Function):
    """m = sigmoid(s e) forward; backward with the paper's compensation, which rescales the gradient
    by sigma(e)(1 - sigma(e)) / (s sigma(s e)(1 - sigma(s e))), i.e. dL/de = dL/dm * sigma(e)(1 - sigma(e))."""

    @staticmethod
    def forward(ctx, e, s):
        ctx.save_for_backward(e)
        return torch.sigmoid(s * e)

    @staticmethod
    def backward(ctx, grad):
        (e,) = ctx.saved_tensors
        sig = torch.sigmoid(e)
        return grad * sig * (1 - sig), None


SOFT, BINARY, PRUNED = 0, 1, 2


class ChannelMask(nn.Module):
    """m = sigmoid(s e) on the output channels of one layer (applied by a forward hook).

    Modes: SOFT while the extractor trains (s set by the method each batch; eval uses s_max);
    BINARY multiplies by 1[e > 0] (= 1[sigmoid(s_max e) > 0.5]); PRUNED is the identity, the off
    channels' parameters having been zeroed. The mode is part of the state_dict (extra state).
    """

    def __init__(self, channels: int, init: float, s_max: float, compensate: bool = True):
        super().__init__()
        self.e = nn.Parameter(torch.full((channels,), float(init)))
        self.s_max = s_max
        self.s = s_max
        self.compensate = compensate
        self.mode = SOFT

    def value(self) -> torch.Tensor:
        if self.mode != SOFT:
            return (self.e > 0).to(self.e.dtype)
        s = self.s if self.training else self.s_max
        return _CompensatedSigmoid.apply(self.e, s) if self.compensate else torch.sigmoid(s * self.e)

    def hook(self, module, inputs, output):
        if self.mode == PRUNED:
            return output
        m = self.value().to(output.dtype)
        return output * (m.view(1, -1, 1, 1) if output.dim() == 4 else m)

    def get_extra_state(self):
        return {"mode": self.mode}

    def set_extra_state(self, state) -> None:
        self.mode = state["mode"]


def masked_layers(ext: nn.Module) -> list[tuple[nn.Module, nn.Module, int | None]]:
    """(weight layer, layer whose output is masked, index of the layer feeding its input or None).

    The input of a layer counts as masked only when it is exactly the masked output of an earlier
    layer: a chain (MLP, ConvNet, a ResNet's stem into its first block, conv1 into conv2 of a block).
    A residual sum is not, so a block's conv1 and shortcut keep all their input channels.
    """
    layers: list[tuple[nn.Module, nn.Module, int | None]] = []

    def add(w, out, src):
        layers.append((w, out, src))
        return len(layers) - 1

    if isinstance(ext, MLP):
        prev = None
        for lin in ext.layers:
            prev = add(lin, lin, prev)
    elif isinstance(ext, ConvNet):
        prev = None
        for stage in ext.stages:
            prev = add(stage[0], stage[1], prev)
    elif isinstance(ext, ResNet):
        src = add(ext.stem[0], ext.stem[1], None)
        for stage in ext.stages:
            for block in stage:
                first = add(block.conv1, block.bn1, src)
                add(block.conv2, block.bn2, first)
                if block.down is not None:
                    add(block.down[0], block.down[1], src)
                src = None
    else:
        raise TypeError(f"DER channel masks support the mlp, convnet and ResNet backbones, not {type(ext).__name__}")
    return layers


def _shape(w: nn.Module) -> tuple[int, int, int]:
    """(kernel size K, input channels, output channels) of a conv or linear layer."""
    if isinstance(w, nn.Conv2d):
        return w.kernel_size[0] * w.kernel_size[1], w.in_channels, w.out_channels
    return 1, w.in_features, w.out_features


class MaskedExtractor(nn.Module):
    """A feature extractor with a channel mask on the output of each of its conv/linear layers.

    ``net`` is the plain extractor: a copy of it starts the next task's extractor.
    """

    def __init__(self, net: nn.Module, init: float = 1.0, s_max: float = 400.0, compensate: bool = True):
        super().__init__()
        self.net = net
        self.out_dim = net.out_dim
        self._layers = masked_layers(net)
        self.masks = nn.ModuleList(ChannelMask(_shape(w)[2], init, s_max, compensate) for w, _, _ in self._layers)
        for (_, out, _), mask in zip(self._layers, self.masks):
            out.register_forward_hook(mask.hook)

    def forward(self, x: torch.Tensor) -> dict:
        return self.net(x)

    def set_s(self, s: float) -> None:
        for m in self.masks:
            m.s = s

    def sparsity_loss(self) -> torch.Tensor:
        """L_S = sum_l K_l ||m_in(l)||_1 ||m_l||_1 / sum_l K_l c_in(l) c_l (inputs: see masked_layers)."""
        values = [m.value() for m in self.masks]
        num, den = 0.0, 0.0
        for (w, _, src), m in zip(self._layers, values):
            k, c_in, c_out = _shape(w)
            n_in = values[src].sum() if src is not None else c_in
            num = num + k * n_in * m.sum()
            den += k * c_in * c_out
        return num / den

    def pruned_params(self) -> int:
        """Parameters left if the off channels (binary masks) were removed from the network."""
        alive = [(m.e > 0).sum().item() if m.mode != SOFT else _shape(w)[2] for (w, _, _), m in zip(self._layers, self.masks)]
        removed = 0
        for (w, out, src), a_out in zip(self._layers, alive):
            k, c_in, c_out = _shape(w)
            a_in = alive[src] if src is not None else c_in
            removed += k * (c_in * c_out - a_in * a_out)
            per_channel = sum(p.numel() for name, p in out.named_parameters() if name != "weight" or out is not w) // c_out
            removed += per_channel * (c_out - a_out)
        return sum(p.numel() for p in self.net.parameters()) - removed

    @torch.no_grad()
    def prune(self) -> None:
        """Binarise the masks (m > 0.5) and zero the parameters of the off channels; masks become identities."""
        for (w, out, _), mask in zip(self._layers, self.masks):
            off = mask.e <= 0
            w.weight[off] = 0.0
            for p in out.parameters():
                if p.dim() == 1:  # BN weight and bias, or the linear layer's bias
                    p[off] = 0.0
            mask.mode = PRUNED

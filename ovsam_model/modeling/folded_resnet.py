"""open_clip's ModifiedResNet for inference: every BatchNorm folded into its conv, run in channels_last.

The folded copies are plain tensors derived from the module's weights (never registered, never in
a state dict); `ClipTrunk` keeps them while `weights_key` of their sources is unchanged.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from open_clip.modified_resnet import Bottleneck, ModifiedResNet
from torch import nn


def weights_key(tensors: list[torch.Tensor]) -> Optional[tuple]:
    """What identifies the source tensors' values: device and dtype, then each tensor's storage and
    in-place write count (a new storage, a `load_state_dict` copy or any in-place op changes it).
    None when one is an inference tensor: it has no version counter, nothing derived may be kept."""
    try:
        return (tensors[0].device, tensors[0].dtype, tuple([(t.data_ptr(), t._version) for t in tensors]))
    except RuntimeError:  # "Inference tensors do not track version counter"
        return None


def conv_bn_sources(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> list[torch.Tensor]:
    out = [conv.weight, bn.running_mean, bn.running_var]
    out += [t for t in (conv.bias, bn.weight, bn.bias) if t is not None]
    return out


class FoldedConv:
    """conv + eval-mode BatchNorm as one conv with bias, weight in channels_last."""

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
        w = conv.weight
        dt = torch.promote_types(w.dtype, torch.float32)  # fold in ≥ fp32, store in the weights' dtype
        scale = torch.rsqrt(bn.running_var.to(dt) + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight.to(dt)
        shift = -bn.running_mean.to(dt)
        if conv.bias is not None:
            shift = shift + conv.bias.to(dt)
        bias = shift * scale
        if bn.bias is not None:
            bias = bias + bn.bias.to(dt)
        self.weight = (w.to(dt) * scale.view(-1, 1, 1, 1)).to(w.dtype).contiguous(memory_format=torch.channels_last)
        self.bias = bias.to(w.dtype)
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class FoldedBottleneck:
    def __init__(self, block: Bottleneck) -> None:
        self.conv1 = FoldedConv(block.conv1, block.bn1)
        self.conv2 = FoldedConv(block.conv2, block.bn2)
        self.conv3 = FoldedConv(block.conv3, block.bn3)
        self.avgpool = block.avgpool  # parameter-free: AvgPool2d(stride) or Identity
        self.down_pool = self.down = None
        if block.downsample is not None:
            self.down_pool = block.downsample[0]
            self.down = FoldedConv(block.downsample[1], block.downsample[2])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # open_clip's Bottleneck.forward with each BatchNorm folded into its conv
        out = F.relu(self.conv1(x), inplace=True)
        out = F.relu(self.conv2(out), inplace=True)
        out = self.conv3(self.avgpool(out))
        identity = x if self.down is None else self.down(self.down_pool(x))
        out += identity
        return F.relu(out, inplace=True)


class FoldedResNet:
    """ModifiedResNet's stem and layer1..4 with folded BatchNorms, run in channels_last."""

    def __init__(self, visual: ModifiedResNet) -> None:
        self.stem = [FoldedConv(visual.conv1, visual.bn1), FoldedConv(visual.conv2, visual.bn2),
                     FoldedConv(visual.conv3, visual.bn3)]
        self.stem_pool = visual.avgpool
        self.layers = [[FoldedBottleneck(b) for b in layer]
                       for layer in (visual.layer1, visual.layer2, visual.layer3, visual.layer4)]

    @staticmethod
    def sources(visual: ModifiedResNet) -> Optional[list[torch.Tensor]]:
        """The tensors the folded copy is computed from; None when the structure is not the one
        this fold reproduces exactly (then the plain forward runs)."""
        pairs = [(visual.conv1, visual.bn1), (visual.conv2, visual.bn2), (visual.conv3, visual.bn3)]
        acts = [visual.act1, visual.act2, visual.act3]
        pools = [visual.avgpool]
        for layer in (visual.layer1, visual.layer2, visual.layer3, visual.layer4):
            for b in layer:
                if type(b) is not Bottleneck:
                    return None
                acts += [b.act1, b.act2, b.act3]
                pools.append(b.avgpool)
                pairs += [(b.conv1, b.bn1), (b.conv2, b.bn2), (b.conv3, b.bn3)]
                if b.downsample is not None:
                    if len(b.downsample) != 3:
                        return None
                    pools.append(b.downsample[0])
                    pairs.append((b.downsample[1], b.downsample[2]))
        if (any(type(a) is not nn.ReLU for a in acts)
                or any(type(m) not in (nn.AvgPool2d, nn.Identity) for m in pools)):
            return None
        out: list[torch.Tensor] = []
        for conv, bn in pairs:
            if (type(conv) is not nn.Conv2d or type(bn) is not nn.BatchNorm2d or conv.padding_mode != "zeros"
                    or bn.running_mean is None or bn.training):
                return None
            out += conv_bn_sources(conv, bn)
        return out

    def __call__(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        x = pixels.contiguous(memory_format=torch.channels_last)
        for conv in self.stem:
            x = F.relu(conv(x), inplace=True)
        x = self.stem_pool(x)
        feats = []
        for layer in self.layers:
            for block in layer:
                x = block(x)
            feats.append(x.contiguous())  # downstream gets the usual NCHW-contiguous layout
        return feats

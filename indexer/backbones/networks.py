"""The backbone networks themselves (PyTorch modules), built by the registry (``catalens.indexer.backbones``),
and the modules the features build on a backbone's stages.

Kept apart from the registry and the features so that naming, checking and preprocessing a
backbone, and running its converted network, never import torch (over a second of every
command's start); only building a network does.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import torch
from torch import nn


class Backbone(nn.Module):
    """A CNN as an ordered list of stages, in timm's terms.

    ``forward_features`` runs every stage and returns the last feature maps (B, C, h, w);
    ``forward_head`` pools them into the (B, num_features) descriptor; ``forward`` is both.
    Code that needs part of the network (the autoencoder reads the maps, fine-tuning trains
    the top stages on cached outputs of the bottom ones) asks for ``stages`` instead of
    reaching into a particular network's attributes.
    """

    num_features: int

    def stages(self) -> list[nn.Module]:
        raise NotImplementedError

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        for stage in self.stages():
            images = stage(images)
        return images

    def forward_head(self, maps: torch.Tensor) -> torch.Tensor:
        return maps.mean(dim=(2, 3))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(images))



# --- EfficientNet-Lite


class _Stem(nn.Module):
    def __init__(self, conv: nn.Module, bn: nn.Module, act: nn.Module):
        super().__init__()
        self.conv, self.bn, self.act = conv, bn, act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class EfficientNetLite(Backbone):
    """EfficientNet-Lite up to the head convolution, global-average pooled (1280-d).

    Stages: the stem, the 16 MBConv blocks, the head convolution.
    """

    num_features = 1280

    def __init__(self, variant: str, weights: Path | None, pretrained: bool):
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        if pretrained:
            path = weights
            # The package prints a line on load; stdout belongs to the caller (JSON lines).
            with contextlib.redirect_stdout(io.StringIO()):
                net = EfficientNet.from_pretrained(f"efficientnet-{variant}", weights_path=str(path))
        else:
            net = EfficientNet.from_name(f"efficientnet-{variant}")
        # Blocks are called without drop-connect, which only acts in training mode anyway.
        self.layers = nn.ModuleList([_Stem(net._conv_stem, net._bn0, net._swish), *net._blocks,
                                     _Stem(net._conv_head, net._bn1, net._swish)])

    def stages(self) -> list[nn.Module]:
        return list(self.layers)



# --- torchvision backbones


def load_state(model: nn.Module, path: Path) -> nn.Module:
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model


class ResNetPooled(Backbone):
    """ResNet-50's stem and four residual stages, global-average pooled (2048-d)."""

    num_features = 2048

    def __init__(self, model: nn.Module):
        super().__init__()
        self.layers = nn.ModuleList([
            nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool),
            model.layer1, model.layer2, model.layer3, model.layer4,
        ])

    def stages(self) -> list[nn.Module]:
        return list(self.layers)


class Fc7(Backbone):
    """A VGG/AlexNet convolutional trunk (one stage), then its classifier cut after fc7's ReLU (4096-d)."""

    num_features = 4096

    def __init__(self, model: nn.Module, fc7_end: int):
        super().__init__()
        self.features, self.avgpool = model.features, model.avgpool
        self.fc7 = model.classifier[:fc7_end]

    def stages(self) -> list[nn.Module]:
        return [self.features]

    def forward_head(self, maps: torch.Tensor) -> torch.Tensor:
        return self.fc7(torch.flatten(self.avgpool(maps), 1))


# --- modules built on a backbone's stages, one for each feature that converts one


class FeatureMaps(nn.Module):
    """A backbone up to its last feature maps (timm's ``forward_features``): the autoencoder's input."""

    def __init__(self, backbone: Backbone):
        super().__init__()
        self.backbone = backbone

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_features(images)


class AdaptedNetwork(nn.Module):
    """Images through the frozen stages, then the adapted top stages, pooled (``deep_ft``)."""

    def __init__(self, frozen: nn.Module, top: nn.Module):
        super().__init__()
        self.frozen, self.top = frozen, top

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.top.embed(self.frozen(images))


class GramVectors(nn.Module):
    """Images to the concatenated upper triangles of the Gram matrices at ``stages``."""

    def __init__(self, backbone: Backbone, stages: tuple[int, ...], input_size: int, max_channels: int):
        super().__init__()
        self.layers = nn.ModuleList(backbone.stages()[: max(stages) + 1])
        self.taps = sorted(stages)
        self.groups: dict[int, tuple[int, int]] = {}
        # Per tapped stage: how channels are averaged in groups, and where the upper triangle lies
        # in the flattened C x C matrix; fixed here, since OpenVINO converts a fixed gather and
        # not torch.triu_indices.
        with torch.inference_mode():
            x = torch.zeros(1, 3, input_size, input_size)
            for index, layer in enumerate(self.layers):
                x = layer(x)
                if index in self.taps:
                    group = -(-x.shape[1] // max_channels)
                    channels = x.shape[1] // group
                    self.groups[index] = (channels, group)
                    rows, cols = torch.triu_indices(channels, channels)
                    self.register_buffer(f"upper{index}", rows * channels + cols)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        grams, x = [], images
        for index, layer in enumerate(self.layers):
            x = layer(x)
            if index in self.taps:
                channels, group = self.groups[index]
                maps = x[:, : channels * group].flatten(2)
                maps = maps.reshape(maps.shape[0], channels, group, maps.shape[-1]).mean(dim=2)
                maps = maps - maps.mean(dim=2, keepdim=True)
                gram = (maps @ maps.transpose(1, 2) / maps.shape[-1]).flatten(1)
                upper = torch.index_select(gram, 1, getattr(self, f"upper{index}"))
                grams.append(torch.sign(upper) * torch.sqrt(torch.abs(upper)))
        return torch.cat(grams, dim=1)

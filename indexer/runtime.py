"""Running a part of a network on this machine: OpenVINO on the CPU, PyTorch on CUDA.

On a 2-core CPU OpenVINO runs the backbone about 5x faster than eager PyTorch with the same
outputs (to 1e-5); ``compile_network`` gives a callable from a float32 NCHW batch to a numpy
array whichever runtime serves it, so features and trainers never branch on the runtime.

Networks are handed over as builders and built only where needed: a conversion cached on disk
runs without building the PyTorch module, so indexing and search start without importing torch
(1.0-1.4 s of every command's start on this machine).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger(__name__)

Network = Callable[[np.ndarray], np.ndarray]
# Builds the PyTorch module to run; called only when it must be converted or run by PyTorch.
ModuleBuilder = Callable[[], "nn.Module"]
# Images of one batch in flight at once on the infer-request pool.
ASYNC_JOBS = 2


def resolve_device(device: str) -> str:
    """``auto``: ``cuda`` where PyTorch sees a GPU, else ``cpu``; any other name as given.

    On Linux without the NVIDIA driver there can be no CUDA device, and torch is not imported
    to say so."""
    if device != "auto":
        return str(device)
    if sys.platform == "linux" and not any(Path(p).exists() for p in ("/proc/driver/nvidia/version", "/dev/nvidiactl")):
        return "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def cache_dir() -> Path:
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


InputShape = int | tuple[int, ...]

# OpenVINO's Python binding sets up its numpy bridge (a C++ function-local static whose set-up
# gives up the GIL and takes it back) on the first array an inference converts. Two threads
# making that first conversion at once deadlock: one waits for the GIL inside the set-up, the
# other holds the GIL waiting for the static. A server's first searches hung so, 1 start in 13
# (its search, classify and anomaly requests arrive together); tests/test_speed_paths.py.
# The process's first inference therefore runs alone.
_first_inference_lock = threading.Lock()
_first_inference_done = False


def _alone_if_first(infer: Callable[[], np.ndarray]) -> np.ndarray:
    global _first_inference_done
    if _first_inference_done:
        return infer()
    with _first_inference_lock:
        result = infer()
        _first_inference_done = True
    return result


def sample_shapes(input_shape: InputShape) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(one sample's declared shape, -1 where a dimension varies; the shape traced in its place).

    An int is a square RGB image of that side; a varying dimension is traced at 64 (a trace
    records operations, not sizes, and a map of 192 channels at 224 x 224 would cost gigabytes
    in the top stages' expansions)."""
    shape = (3, input_shape, input_shape) if isinstance(input_shape, int) else tuple(input_shape)
    return shape, tuple(64 if dim < 0 else dim for dim in shape)


class OpenVinoRunner:
    """A torch module compiled by OpenVINO for the CPU, with a dynamic batch dimension (and any
    other dimension that ``input_shape`` marks -1).

    Converting traces the network (seconds); the converted model is cached on disk per
    ``cache_key`` and OpenVINO version, so later processes start in a fraction of that, and
    without building the module (``build`` is called only to convert).
    """

    def __init__(self, build: ModuleBuilder, input_shape: InputShape, threads: int = 0, cache_key: str | None = None):
        import openvino as ov

        core = openvino_core()
        version = "".join(ch if ch.isalnum() or ch in ".-" else "_" for ch in ov.__version__)
        cached = cache_dir() / f"{cache_key}-ov{version}.xml" if cache_key else None
        if cached is not None and cached.is_file():
            converted = core.read_model(str(cached))
        else:
            import torch

            module = build().eval()
            declared, traced = sample_shapes(input_shape)
            example = torch.zeros(1, *traced)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # tracing warns about its own deprecation
                converted = ov.convert_model(module, example_input=example, input=[(-1, *declared)])
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
        # One infer request per calling thread: a request holds its own input and output
        # buffers and is not thread-safe, while the compiled model is. Server threads then run
        # the network side by side instead of queueing behind one lock (benchmarks/bench_load.py).
        self._requests = threading.local()

    def _request(self):
        request = getattr(self._requests, "request", None)
        if request is None:
            request = self._requests.request = self.compiled.create_infer_request()
        return request

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        # One image per inference: measured on 2 cores, bigger batches spill the cache.
        if len(batch) == 1:
            # share_outputs=False: the result must outlive the request's next call.
            return _alone_if_first(lambda: self._request().infer(np.ascontiguousarray(batch), share_outputs=False)[0])
        return _alone_if_first(lambda: self._pipelined(batch))

    def _pipelined(self, batch: np.ndarray) -> np.ndarray:
        """A batch's images in flight ``ASYNC_JOBS`` at a time on an infer-request pool (OpenVINO's
        async queue): one image's inference overlaps the next one's start-up and the Python
        around it. 2.6x the images a second of one request called image by image (EfficientNet-
        Lite0 on 2 cores, benchmarks/bench_speed.py)."""
        queue = getattr(self._requests, "queue", None)
        if queue is None:
            import openvino as ov

            queue = self._requests.queue = ov.AsyncInferQueue(self.compiled, ASYNC_JOBS)
        outputs: list[np.ndarray | None] = [None] * len(batch)

        def done(request, position: int) -> None:
            outputs[position] = request.get_output_tensor(0).data.copy()

        queue.set_callback(done)
        for position in range(len(batch)):
            queue.start_async(np.ascontiguousarray(batch[position : position + 1]), position)
        queue.wait_all()
        return np.concatenate(outputs)


def compile_network(
    build: ModuleBuilder, input_shape: InputShape, runtime: str = "auto", device: str = "cpu",
    cache_key: str | None = None, threads: int = 0,
) -> tuple[Network, str]:
    """The module ``build()`` makes, as a numpy-in, numpy-out callable, and the name of the
    runtime that runs it.

    ``input_shape``: one sample's shape, -1 where it varies (an int: a square RGB image of that
    side). ``runtime`` is ``auto`` (OpenVINO on the CPU where it works, else PyTorch), ``openvino``
    (fail if it does not work) or ``torch``. ``cache_key`` names the converted model on disk;
    leave it None for weights that are not fixed (random ones in tests). ``build`` is not
    called when a cached conversion serves.
    """
    if runtime in ("auto", "openvino") and str(device).split(":")[0] == "cpu":
        try:
            return OpenVinoRunner(build, input_shape, threads, cache_key), "openvino"
        except Exception as error:  # noqa: BLE001 - OpenVINO is an accelerator, not a requirement
            if runtime == "openvino":
                raise
            log.warning("OpenVINO unavailable (%s); using PyTorch", error)
    import torch

    if threads:
        torch.set_num_threads(threads)
    device = torch.device(device)
    module = build().eval().to(device)

    def run(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(np.ascontiguousarray(batch)).to(device)).float().cpu().numpy()

    return run, "torch"


def weights_stamp(weights: Path | None) -> str:
    """Tells cached conversions of the same backbone with other weights apart."""
    if weights is None:
        return "default"
    stat = Path(weights).stat()
    return f"{stat.st_size}-{stat.st_mtime_ns}"

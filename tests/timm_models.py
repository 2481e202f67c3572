"""timm for the tests: its reparameterizable families, and an import that works on CPU-only machines.

scripts/env.sh installs timm, torchvision and pillow into their own folder, `<venv>/extras/timm`
(pip --target, no dependencies), not into the venv: a torchvision whose C library cannot load
breaks `import torchvision`, and transformers imports torchvision wherever it is installed, so
it would break every Hugging Face model (and `surgeon demo`) in the venv. Only the tests that
ask for timm put that folder on the path. A timm installed in the environment is used as it is.

timm imports torchvision. The torchvision wheel that pairs with the pinned torch is a CUDA build
here: its C library (`torchvision/_C.so`) does not load, and torchvision's import then fails while
registering fake kernels for operators that were never defined (`torchvision::nms`, ...).
Classification models use none of those detection operators, so when the library cannot load,
`import_timm` skips the two registration modules before the first torchvision import. Where the
library loads (a matching CPU or CUDA build), nothing is stubbed.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import types
from pathlib import Path

import torch

_REGISTRATIONS = ("torchvision._meta_registrations", "torchvision._autograd_registrations")

# One small model per timm family that ships `reparameterize_model` support (timm 1.0.31:
# every model file with a `reparameterize` or `fuse` method) -> the input size it is tested at.
# Sizes are the smallest the family's fixed-resolution parts (attention biases, windows) accept.
FAMILIES = {
    "repvgg_a0": 64,         # byobnet: RepVGG blocks (3x3 + 1x1 + identity BN)
    "mobileone_s0": 64,      # byobnet: MobileOne (k over-parameterized branches)
    "fastvit_t8": 64,        # RepMixer, RepCPE, MobileOne stems
    "levit_128s": 224,       # Linear + BatchNorm1d (ConvNorm / LinearNorm)
    "efficientvit_m0": 224,  # cascaded group attention, ConvNorm
    "repghostnet_050": 64,   # RepGhost: BN-only identity branch
    "repvit_m0_9": 64,       # RepViT: RepVGGDW, Conv2d_BN
    "tiny_vit_5m_224": 224,  # ConvNorm, windowed attention
    "efficientvim_m1": 64,   # ConvLayer2D / ConvLayer1D with BN
    "ghostnetv3_050": 64,    # GhostNetV3: re-parameterized ghost modules
    "iformer_t": 64,         # RepCPE, ConvNorm
    "lcnetv2_small": 64,     # LCNetV2 reparameterizable depthwise blocks
    "nextvit_small": 64,     # NextViT: ConvBNReLU, BN before linear
    "shvit_s1": 64,          # SHViT: Conv2d_BN, BN_Linear
}


def _torchvision_library_loads() -> bool:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return False
    folder = os.path.dirname(spec.origin)
    libraries = [f for f in os.listdir(folder) if f.startswith("_C.") or f == "_C.so"]
    if not libraries:
        return False
    try:
        torch.ops.load_library(os.path.join(folder, libraries[0]))
    except (OSError, RuntimeError):
        return False
    return True


EXTRAS = Path(sys.prefix) / "extras" / "timm"


def import_timm(skip: bool = True):
    """timm; where it is missing, a pytest skip (or, with skip=False, an ImportError) saying so."""
    if importlib.util.find_spec("timm") is None and EXTRAS.is_dir() and str(EXTRAS) not in sys.path:
        sys.path.append(str(EXTRAS))
        importlib.invalidate_caches()
    if importlib.util.find_spec("timm") is None or importlib.util.find_spec("torchvision") is None:
        why = f"timm and torchvision are not installed (scripts/env.sh installs them into {EXTRAS})"
        if not skip or os.environ.get("CI"):        # CI installs them: a skip there would hide the tests
            raise ImportError(why)
        import pytest

        pytest.skip(why)
    if "torchvision" not in sys.modules and not _torchvision_library_loads():
        for name in _REGISTRATIONS:
            sys.modules.setdefault(name, types.ModuleType(name))
    import timm

    return timm


def counts(gm) -> dict[str, int]:
    """conv and batch_norm ops in a captured graph."""
    targets = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    return {"conv": sum("aten.conv" in t for t in targets), "batch_norm": sum("batch_norm" in t for t in targets)}


def create(timm, name: str, seed: int = 0, classes: int = 10) -> tuple[torch.nn.Module, torch.Tensor]:
    """A timm model with random weights and non-trivial BN statistics, in eval, and its input."""
    from tests.passes.rep_models import randomize_bn

    size = FAMILIES[name]
    torch.manual_seed(seed)
    model = randomize_bn(timm.create_model(name, pretrained=False, num_classes=classes), seed=seed)
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(seed + 1))
    return model, x

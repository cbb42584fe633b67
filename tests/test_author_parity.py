"""The reference models against outputs recorded from the first author's public LGD-3D module.

See ``author_fixture.py`` for how ``tests/data/author_*.pt`` were made. The whole networks are compared in
float64 (recorded in float64): the tolerances leave room for float64 rounding only, on any CPU. The basic
blocks are compared in float32, single-threaded, as recorded (a wrong variant order, a missing ReLU or a wrong
diffusion path moves these values by O(1), i.e. by 100 - 1000x the float32 tolerance).
"""

import os

import pytest
import torch

import author_fixture as F
from lgd_fast import create_model
from lgd_fast.models import P3DBasicBlock

DATA = os.path.join(os.path.dirname(__file__), "data")
LOGIT_RTOL = 1e-4  # max |ours - author| / max |author| (float32)
GRAD_RTOL = 1e-3  # |<grad diff, random direction>| / (|grad| |direction|), and relative error of |grad| (float32)
LOGIT_RTOL_64, GRAD_RTOL_64 = 1e-10, 1e-8  # the same in float64 (bit for bit, R50 and R101, on the recording CPU)


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _load(name):
    return torch.load(os.path.join(DATA, name), weights_only=True)


def _assert_close(ours, author, name, rtol=LOGIT_RTOL):
    assert ours.dtype == author.dtype, f"{name}: {ours.dtype} against the recorded {author.dtype}"
    err = ((ours - author).abs().max() / author.abs().max()).item()
    assert err <= rtol, f"{name}: relative error {err:.2e} against the author's module"


def _assert_grads_close(ours, author, rtol=GRAD_RTOL):
    assert ours.keys() == author.keys()
    for key, (proj, d_norm, g_norm) in author.items():
        o_proj, _, o_norm = ours[key]
        assert g_norm > 0, f"{key}: the recorded gradient is zero, so the probe proves nothing"
        assert abs(o_proj - proj) <= rtol * d_norm * g_norm, f"{key}: gradient differs from the author's"
        assert abs(o_norm - g_norm) <= rtol * g_norm, f"{key}: gradient norm {o_norm} vs author {g_norm}"


@pytest.mark.parametrize("arch", ["r50", pytest.param("r101", marks=pytest.mark.slow)])
def test_lgd3d_equals_author_module(arch, one_thread):
    recorded = _load(f"author_{arch}_float64.pt")
    model = create_model(f"lgd3d_{arch}", F.NUM_CLASSES, classifier="two_heads")
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == recorded["keys"]
    assert F.checksums(model) == pytest.approx(recorded["checksums"], rel=1e-12), "torch's random streams changed"
    ours = F.run_model(model, torch.float64)
    for name in ("eval_logits", "train_local", "train_global"):
        _assert_close(ours[name], recorded[name], name, LOGIT_RTOL_64)
    _assert_grads_close(ours["grad_probes"], recorded["grad_probes"], GRAD_RTOL_64)


@pytest.mark.parametrize("case", F.BLOCK_CASES, ids=lambda c: "_".join(map(str, c)))
def test_basic_blocks_equal_author_blocks(case, one_thread):
    variant, in_channels, planes, stride = case
    recorded = _load("author_basic_blocks.pt")[f"{variant}_{in_channels}_{planes}_{stride}"]
    block = P3DBasicBlock(in_channels, planes, variant=variant, stride=stride)
    assert {k: tuple(v.shape) for k, v in block.state_dict().items()} == recorded["keys"]
    ours = F.run_block(block, in_channels)
    _assert_close(ours["out"], recorded["out"], "x'")
    _assert_close(ours["g"], recorded["g"], "g'")
    _assert_grads_close(ours["grad_probes"], recorded["grad_probes"])

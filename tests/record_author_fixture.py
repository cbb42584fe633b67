"""Records ``tests/data/author_<arch>_float64.pt`` from the first author's public LGD-3D module.

    git clone https://github.com/ZhaofanQiu/Optimization-Planning-for-3D-ConvNets /tmp/opt3d
    python tests/record_author_fixture.py /tmp/opt3d            # r50 and r101 into tests/data/

It imports ``model/lgd_p3d_resnet.py`` and ``layer/pooling_factory.py`` from that checkout (nothing of it is
copied here), builds ``lgd_p3d_resnet50``/``101`` with the ``PoolingAverage`` head and ``author_fixture``'s
number of classes, and runs ``author_fixture.run_model`` in float64, single-threaded.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import types
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import author_fixture as F  # noqa: E402


def _author_module(checkout: Path):
    """The checkout's model/lgd_p3d_resnet.py as a module (its package ``model`` stubbed: only that file and
    model_factory.py, which it imports, are needed) and its PoolingAverage."""
    package = types.ModuleType("model")
    package.__path__ = [str(checkout / "model")]
    sys.modules["model"] = package
    spec = importlib.util.spec_from_file_location("model.lgd_p3d_resnet", checkout / "model" / "lgd_p3d_resnet.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    sys.path.insert(0, str(checkout))
    from layer.pooling_factory import PoolingAverage

    return module, PoolingAverage


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkout", type=Path, help="a checkout of ZhaofanQiu/Optimization-Planning-for-3D-ConvNets")
    parser.add_argument("--arch", nargs="+", default=["r50", "r101"], choices=["r50", "r101"])
    parser.add_argument("--out", type=Path, default=HERE / "data")
    args = parser.parse_args(argv)
    author, pooling = _author_module(args.checkout)
    torch.set_num_threads(1)
    for arch in args.arch:
        model = getattr(author, f"lgd_p3d_resnet{arch[1:]}")(pooling, num_classes=F.NUM_CLASSES)
        keys = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        recorded = F.run_model(model, torch.float64)
        recorded.update(keys=keys, checksums=F.checksums(model))
        path = args.out / f"author_{arch}_float64.pt"
        torch.save(recorded, path)
        print("wrote", path)


if __name__ == "__main__":
    main()

import os
import sys
import zlib

import pytest
import torch

# Fast models made in tests take the execution plan's deterministic default (no timing decides a code path, so
# every run takes the same one); tests of measured plans ask for plan="measure". Subprocesses inherit it.
os.environ["LGD_FAST_PLAN"] = "default"

sys.path.insert(0, os.path.dirname(__file__))  # test helpers (author_fixture, op_testing) import by name

from lgd_fast.ops._common import compile_cache_tag  # noqa: E402
from op_testing import SEED  # noqa: E402

torch.compiler.config.cache_key_tag = compile_cache_tag()  # no graph compiled under an older fake is reused


@pytest.fixture
def gen(request) -> torch.Generator:
    """A generator seeded from this run's SEED and the test's name: fresh inputs every run, replayable."""
    request.node.user_properties.append(("seed", SEED))
    return torch.Generator().manual_seed(SEED ^ zlib.crc32(request.node.name.encode()))


@pytest.fixture(autouse=True)
def seeded_global_rng(request):
    """The global torch generator (module initialisation, dropout, anything drawn without ``gen``) seeded from
    SEED and the test's name: such draws are fresh every run, replayable with LGD_FAST_TEST_SEED, and no test's
    inputs depend on which tests ran before it in the process."""
    torch.manual_seed((SEED ^ zlib.crc32(request.node.name.encode()) ^ 0x9E3779B9) & 0xFFFFFFFF)


@pytest.fixture(autouse=True)
def process_settings_restored():
    """torch's process-wide settings as they were before each test (deterministic algorithms and their NaN fill
    of fresh memory, intra-op threads): a test that changes one and fails half-way does not run the rest of the
    suite under it."""
    import torch.utils.deterministic

    was = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
           torch.utils.deterministic.fill_uninitialized_memory, torch.get_num_threads())  # fmt: skip
    yield
    torch.use_deterministic_algorithms(was[0], warn_only=was[1])
    torch.utils.deterministic.fill_uninitialized_memory = was[2]
    if torch.get_num_threads() != was[3]:
        torch.set_num_threads(was[3])


def pytest_report_header(config):
    return f"test seed: LGD_FAST_TEST_SEED={SEED} replays this run's random inputs"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        report.sections.append(("seed", f"replay with LGD_FAST_TEST_SEED={SEED} python -m pytest '{item.nodeid}'"))


@pytest.fixture
def isa(request):
    """Forces the CPU kernels' SIMD path (indirect parameter) for one test, back to automatic afterwards."""
    from lgd_fast import _C

    _C._set_cpu_isa(request.param)
    yield request.param
    _C._set_cpu_isa("auto")


@pytest.fixture
def poisoned():
    """Uninitialised memory (every torch.empty / at::empty) is filled with NaN while the test runs."""
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(was)

"""Test session set-up: two host CPU devices so sharded code paths run for real, and the shared
reference artifacts (real img2dataset shards, released checkpoints, class lists) as fixtures."""
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

# Must happen before jax is imported anywhere in the test session (subprocesses inherit it).
# LLVM level 0 compiles the suite's many small CPU programs ~30% faster; tests that compare
# results only compare runs made under the same flags, and the steps' own CPU option (level 1,
# which XLA_FLAGS overrides) is checked with the option named explicitly (test_train_step.py).
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=2 {TEST_XLA_FLAGS}")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# One XLA compilation cache for the whole session, inherited by every subprocess: the many
# train.py runs of one tiny config (resumes, preemptions, sweeps) and the tests that build the
# same step compile it once. A cached program is the one XLA would compile again, so results do
# not change; a test about compilation itself turns the cache off (see `no_compilation_cache`).
# COYO_VIT_TEST_XLA_CACHE=0 runs the suite without it.
_XLA_CACHE = None
if os.environ.get("COYO_VIT_TEST_XLA_CACHE", "1") != "0" and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _XLA_CACHE = tempfile.mkdtemp(prefix="coyo_vit_tests_xla_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _XLA_CACHE
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared"


def pytest_sessionfinish(session, exitstatus) -> None:
    if _XLA_CACHE:
        shutil.rmtree(_XLA_CACHE, ignore_errors=True)


@pytest.fixture
def no_compilation_cache():
    """For tests that look at what compiling does (dumps, options): compile for real."""
    import jax

    jax.config.update("jax_enable_compilation_cache", False)
    yield
    jax.config.update("jax_enable_compilation_cache", True)


# The suite runs on 2 pytest-xdist workers (pytest.ini), each test file whole on one worker so
# that its module-scoped runs are made once; files that share a session-scoped run form one group.
# The slowest files go first, so that neither worker is left with one of them at the end.
_SHARED_RUNS = {"tests/training/test_elastic_resume.py": "tests/training/test_multiprocess.py"}
_SLOWEST_FIRST = ("tests/training/test_train_loop.py", "tests/training/test_multiprocess.py",
                  "tests/training/test_elastic_resume.py", "tests/tools/test_sweep.py",
                  "tests/models/test_model.py", "tests/training/test_train_step.py",
                  "tests/benchmarks/test_benchmarks.py", "tests/training/test_finetune.py")


def _test_file(item) -> str:
    return item.nodeid.split("::")[0]


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(config, items) -> None:
    """Groups each file's tests for xdist and puts the slowest files first. Without ../shared,
    every test that reads it (through the fixtures below or a module's `SHARED` paths, imported
    from here) is skipped with the reason, not failed."""
    rank = {name: i for i, name in enumerate(_SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(_test_file(item), len(rank)))  # stable: file order kept
    for item in items:
        group = _SHARED_RUNS.get(_test_file(item), _test_file(item))
        item.add_marker(pytest.mark.xdist_group(group))
    if (SHARED / "fixtures").is_dir():
        return
    skip = pytest.mark.skip(reason=f"the shared reference artifacts are not at {SHARED} (they "
                                   "sit beside the checkout as ../shared)")
    for item in items:
        module = getattr(item, "module", None)
        if (getattr(module, "SHARED", None) is SHARED
                or {"shared_fixtures", "shared_data"} & set(getattr(item, "fixturenames", ()))):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_fixtures() -> Path:
    """`../shared/fixtures` beside the checkout: real artifacts made by the tools our users use."""
    path = SHARED / "fixtures"
    if not path.is_dir():
        pytest.skip(f"the shared reference artifacts are not at {path} (they sit beside the "
                    "checkout as ../shared/fixtures)")
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """`../shared/data`: the ImageNet-21k/1k class lists and the ImageNet-ReaL labels."""
    path = SHARED / "data"
    if not path.is_dir():
        pytest.skip(f"the shared class lists and ReaL labels are not at {path}")
    return path

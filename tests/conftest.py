"""Test-wide settings. TRITON_INTERPRET must be set before anything imports triton (peft,
transformers model modules and torch.compile do), so it is set here, before any test module loads,
and only without a GPU: on a GPU the Triton tests run the compiled kernels."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # shared test helpers (cli_helpers) for every test folder
VQA_RAD = REPO.parent / "shared" / "data" / "vqa_rad"


@pytest.fixture
def registry():
    """A fresh registry (built-ins plus installed entry points), also made the process default."""
    import peftmed.plugins as plugins

    reg = plugins.build_registry()
    old = plugins._default
    plugins.set_default_registry(reg)
    yield reg
    plugins.set_default_registry(old)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread: tiny models on a shared 2-core machine only pay for thread hand-offs."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def vqa_rad_dir():
    if not (VQA_RAD / "trainset.json").is_file():
        pytest.skip(f"VQA-RAD not found at {VQA_RAD} (expected ../shared/data/vqa_rad beside the repo)")
    return VQA_RAD


@pytest.fixture(autouse=True)
def _no_ambient_peftmed_settings(monkeypatch):
    """Every test starts without the caller's PEFTMED_* settings (plugin selection, strict mode, kernel choice):
    a test that needs one sets it itself."""
    for key in [k for k in os.environ if k.startswith("PEFTMED_") and not k.startswith("PEFTMED_FUZZ")]:
        monkeypatch.delenv(key)


# What makes a test slow enough to leave out of `make quick`: it runs peftmed (or torchrun) in a subprocess,
# compiles, fuzzes, spawns processes, or runs a bench or a training run end to end. Read from the test's source
# and its fixtures' (so a new test is classified without a word), plus any explicit @pytest.mark.slow.
SLOW_SIGNS = ("subprocess", "peftmed(", "torchrun(", "mp.spawn", "torch.compile", "_fuzz_folder", "@FUZZ", "given(",
              "run_bench(", "Popen", "main([*TRAIN", "main([\"train\"", "main(['train'", "plan_memory(", "measure(")


def _source(fn) -> str:
    import inspect

    try:
        return inspect.getsource(fn)
    except (OSError, TypeError):
        return ""


def _is_slow(item) -> bool:
    texts = [_source(getattr(item, "function", None))]
    info = getattr(item, "_fixtureinfo", None)
    for defs in (info.name2fixturedefs.values() if info is not None else ()):
        texts += [_source(d.func) for d in defs if "conftest" not in str(getattr(d, "baseid", "") or "")
                  or d.argname not in ("registry", "one_thread", "vqa_rad_dir")]
    return any(sign in text for text in texts for sign in SLOW_SIGNS)


# What a full run measured: the tests that would take `make quick` over its budget (the slowest first, until the
# rest fit in QUICK_BUDGET_S on this 2-core machine), written by `make test` (PEFTMED_WRITE_SLOW_LIST=1) and read
# here, so that a test that grows slow leaves the quick set at the next full run with no edit.
SLOW_LIST = Path(__file__).resolve().parent / "slow_tests.txt"
QUICK_BUDGET_S = 40.0  # the run measured 137 s at a 75 s budget: collection and imports take the rest
_durations: dict[str, float] = {}
_slow_by_sign: set[str] = set()


def _listed_slow() -> set[str]:
    try:
        return {line.strip() for line in SLOW_LIST.read_text().splitlines() if line.strip() and line[0] != "#"}
    except OSError:
        return set()


def pytest_collection_modifyitems(config, items):
    listed = _listed_slow()
    for item in items:
        if "slow" not in item.keywords and _is_slow(item):
            _slow_by_sign.add(item.nodeid)
            item.add_marker(pytest.mark.slow)
        elif "slow" in item.keywords:
            _slow_by_sign.add(item.nodeid)
        elif item.nodeid in listed:
            item.add_marker(pytest.mark.slow)


def pytest_runtest_logreport(report):
    _durations[report.nodeid] = _durations.get(report.nodeid, 0.0) + report.duration  # setup + call + teardown


def pytest_sessionfinish(session, exitstatus):
    """After a whole run (no -m, -k or -x), with PEFTMED_WRITE_SLOW_LIST=1: write SLOW_LIST from its durations."""
    opt = session.config.option
    if os.environ.get("PEFTMED_WRITE_SLOW_LIST") != "1" or opt.markexpr or opt.keyword or opt.maxfail \
            or session.testscollected == 0 or session.shouldfail or session.shouldstop:
        return
    rest = sorted(((d, n) for n, d in _durations.items() if n not in _slow_by_sign), reverse=True)
    total, slow = sum(d for d, _ in rest), []
    for d, nodeid in rest:
        if total <= QUICK_BUDGET_S:
            break
        slow.append(nodeid)
        total -= d
    SLOW_LIST.write_text("# written by `make test` (tests/conftest.py): left out of `make quick` for their measured "
                         f"time; the rest measured {total:.0f} s\n" + "".join(f"{n}\n" for n in sorted(slow)))

"""The bench and tools scripts stay in step with the library: each imports (those that make reference fixtures
need torch, absent here, and are skipped), and the routing bench's timing helper runs on a tiny routed network (a
refactor once renamed what it called and only `bench.py --quick` noticed)."""

import importlib
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import random_opt
from radial_min.radial import RadialNetwork
from radial_min.router import Router, RouterConfig, init_router

BENCH = Path(__file__).resolve().parent.parent / "bench"
SCRIPTS = sorted(p.stem for p in BENCH.glob("*.py"))
TOOLS = BENCH.parent / "tools"


@pytest.fixture(autouse=True)
def bench_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))


@pytest.mark.parametrize("name", SCRIPTS)
def test_bench_script_imports(name):
    module = importlib.import_module(name)
    assert module.__doc__, f"bench/{name}.py says what it measures"
    sys.modules.pop(name, None)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(p.stem for p in TOOLS.glob("*.py")))
def test_tool_script_imports(name, monkeypatch):
    monkeypatch.syspath_prepend(str(TOOLS))
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name in ("torch", "transformers"):
            pytest.skip(f"tools/{name}.py makes reference fixtures with {e.name}")
        raise
    assert module.__doc__, f"tools/{name}.py says what it does"
    sys.modules.pop(name, None)


def test_decision_timer_runs_the_router():
    import routing

    model = random_opt(1)
    cfg = RouterConfig(width=model.config.hidden_size, n_blocks=len(model.blocks), hidden=8)
    net = RadialNetwork(model, Router(cfg, init_router(cfg, 0)))
    us = routing.decision_us(net, n=20)
    assert np.isfinite(us) and us > 0

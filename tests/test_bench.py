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


def test_forced_router_asks_the_router_and_takes_the_scripted_routes():
    """bench/depth_speed.py's routed rows: the real router decides at every step of a decode (so its cost is paid
    where a trained router's would be) and the tokens run exactly the scripted routes; `decisions` counts the
    router's calls and `weight_share` is 1 for every block run, less for skips, and more with fill than with drop."""
    import depth_speed

    model = random_opt(1)
    n, T = len(model.blocks), 12
    cfg = RouterConfig(width=model.config.hidden_size, n_blocks=n, hidden=8, kv_rule="fill")
    router, calls = Router(cfg, init_router(cfg, 0)), []
    real = router.decide
    router.decide = lambda *a: calls.append(1) or real(*a)
    routes = depth_speed.skip_routes(n, T, 0.5)
    assert all(len(r) == n // 2 for r in routes) and len({tuple(r) for r in routes}) > 1
    net = RadialNetwork(model, depth_speed.Forced(router, routes), gate=True, kv_rule="fill")
    ids = np.random.default_rng(0).integers(3, 60, T)
    cache = net.new_cache()
    for t in ids:
        net.forward(np.array([t]), cache, last_only=True)
    assert net.routes == routes
    assert len(calls) == depth_speed.decisions(routes, n) * T
    assert depth_speed.weight_share(model.blocks, depth_speed.skip_routes(n, T, 0.0), True) == 1.0
    drop, fill = (depth_speed.weight_share(model.blocks, routes, f) for f in (False, True))
    assert 0 < drop < fill < 1

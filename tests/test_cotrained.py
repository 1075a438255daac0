"""A co-trained Radial Network is one network at training and at generation: exported by the trainer, loaded by
`radial_min.load` and run token by token by `generate` (the inference kernels), it gives the training
forward's logits and routes, under every cache policy, with and without reuse, pre- and post-LN. And its files:
radial.json checked against its router and checkpoint."""

import json
import re
import shutil

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import radial_min
from radial_min import train as tr
from radial_min.config import OPTConfig
from radial_min.errors import CheckpointError
from radial_min.models.opt import OPT, init_tensors
from radial_min.radial import RadialNetwork
from radial_min.router import Router, RouterConfig, init_router
from conftest import tiny_train_config

TOKENIZER = "weights/opt-kjv-wiki"  # any OPT tokenizer files: the exported checkpoint needs some

configs = st.fixed_dictionaries(
    {
        "seed": st.integers(0, 10_000),
        "layers": st.integers(1, 3),
        "heads": st.sampled_from([1, 2]),
        "pre_norm": st.booleans(),
        "policy": st.sampled_from(["global", "per-layer", "per-step"]),
        "forward_only": st.booleans(),
        "extra_depth": st.integers(-1, 3),
        "scale": st.sampled_from([0.0, 1.0, 3.0]),
    }
)


def random_network(seed, layers, heads, pre_norm, policy, forward_only, extra_depth, scale):
    """A small float32 network trained with its router (gated), moved off its init so routes differ from token to
    token."""
    cfg = OPTConfig(vocab_size=61, hidden_size=16, num_hidden_layers=layers, num_attention_heads=heads, ffn_dim=24,
                    max_position_embeddings=24, word_embed_proj_dim=16, do_layer_norm_before=pre_norm)  # fmt: skip
    n = 2 * layers
    max_depth = max(1, n + extra_depth) if not forward_only else max(1, min(n, n + extra_depth))
    rng = np.random.default_rng(seed)
    t = {k: v + (0.3 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in init_tensors(cfg, seed).items()}
    rc = RouterConfig(16, n, 8, forward_only, max_depth)
    router = {k: v + (0.7 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in init_router(rc, seed).items()}
    router["b2"][n] -= 1.0  # fewer immediate exits
    return RadialNetwork(OPT(cfg, t), Router(rc, router), max_depth, policy, scale, gate=True)


def export(tmp_path, net):
    folder = tmp_path / "net"
    shutil.rmtree(folder, ignore_errors=True)
    tr.export_checkpoint(net, TOKENIZER, folder, dtype="float32")
    return folder


def training_forward(net, ids):
    """The training path (a tape: NumPy ops, the training attention kernel), the whole sequence at once: logits and
    every token's route."""
    logits = net.forward(ids[None], tape=[])
    return logits, net.last_walk.route_lists()


def close(a, b):
    return np.abs(a - b).max() <= 1e-4 * max(1.0, np.abs(b).max())


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(spec=configs, prompt=st.lists(st.integers(3, 60), min_size=1, max_size=6), n_new=st.integers(1, 8))
@pytest.mark.slow
def test_training_forward_is_generation(tmp_path, spec, prompt, n_new):
    trained = random_network(**spec)
    net = radial_min.load(export(tmp_path, trained))
    assert isinstance(net, RadialNetwork) and net.gate and net.cache_policy == trained.cache_policy
    new = radial_min.generate(net, np.array(prompt), n_new, stop_at_eos=False, repetition_penalty=1.0)
    ids = np.array(prompt + new.tolist()[:-1])  # the tokens the network read
    logits, routes = training_forward(trained, ids)
    assert net.routes == routes
    assert (logits[len(prompt) - 1 :].argmax(-1) == new).all()  # greedy generation reads the same logits
    assert close(net.forward(ids), logits)  # and token by token from a fresh cache, every position


def test_co_trained_files(tmp_path):
    """The export holds a plain OPT checkpoint (config.json, model.safetensors) plus the router and radial.json;
    `info`-level attributes are there; settings that contradict the router or the checkpoint are refused."""
    trained = random_network(1, 2, 2, True, "global", False, 2, 1.0)
    folder = export(tmp_path, trained)
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [
            "config.json",
            "generation_config.json",
            "model.safetensors",
            "router.json",
            "router.safetensors",
            "radial.json",
            "vocab.json",
            "merges.txt",
            "tokenizer_config.json",
            "special_tokens_map.json",
        ]
    )
    net = radial_min.load(folder)
    assert net.max_depth == 6 and net.n_params == sum(a.size for a in tr.parameters(trained).values())
    plain = json.loads((folder / "radial.json").read_text())
    for field, value, msg in [
        ("n_blocks", 6, "field 'n_blocks' is 6, but the checkpoint has 4"),
        ("width", 32, "field 'width' is 32, but the checkpoint has 16"),
        ("cache_policy", "everything", "field 'cache_policy' is 'everything', expected one of"),
        ("max_depth", 0, "field 'max_depth' is 0, expected 1 to 16"),
        ("max_depth", 5, "router.json: field 'max_depth' is 6, but radial.json has 5"),
        ("router", "../router", "field 'router' is '../router', expected a file name"),
        ("router", "x", "radial.json: field 'router' is 'x', but x.json and x.safetensors not found"),
        ("router", "a" * 300, "radial.json: field 'router' is 'aaaa"),
        ("gate", "yes", "field 'gate' is 'yes', expected"),
    ]:
        (folder / "radial.json").write_text(json.dumps({**plain, field: value}))
        with pytest.raises(CheckpointError, match=msg.replace("(", r"\(")):
            radial_min.load(folder)
    (folder / "radial.json").write_text(json.dumps(plain))
    for suffix in (".json", ".safetensors"):  # a router of another model (the shipped one: 12 blocks of width 256)
        shutil.copy(f"{TOKENIZER}/router-tau0.2{suffix}", folder / f"router{suffix}")
    with pytest.raises(CheckpointError, match=r"router\.json: field 'n_blocks' is 12, but the checkpoint has 4"):
        radial_min.load(folder)
    export(tmp_path, trained)
    other = json.loads((folder / "router.json").read_text())
    (folder / "router.json").write_text(json.dumps({**other, "n_blocks": 8, "max_depth": 6}))
    with pytest.raises(CheckpointError, match="do not match router.json"):  # weights of 4 blocks, config of 8
        radial_min.load(folder)


# --------------------------------------------------------------------------------------- training and the CLI

TEXTS = [
    "In the beginning was the word, and the word was with the text.\n" * 3,
    "And the earth was without form, and void; and darkness was upon the face of the deep.\n" * 3,
] * 4


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A run folder with a tiny prepared corpus (tokenizer + tokens.npz), which `train` reuses as it finds it."""
    from radial_min import data

    folder = tmp_path_factory.mktemp("corpus")
    train_ids, val = data.prepare_corpus(folder, 300, docs=TEXTS, val_docs={"held": TEXTS[:2]})
    return folder, train_ids, val


def radial_run(out, steps, **kw):
    return tiny_train_config(out, steps, radial=True, target_depth=2.5, router_warmup=2, **kw)


def _initial_router(out, policy):
    """The router a radial run starts from (0 steps trained)."""
    cfg = radial_run(out, 0, cache_policy=policy)
    rc = cfg.radial.router_config(cfg.model.model_config())
    return {tr.ROUTER + k: v for k, v in init_router(rc, 0, cfg.radial.in_order).items()}


@pytest.mark.parametrize("policy,explore", [("global", 0.0), ("per-step", 0.0), ("global", 0.3)])
@pytest.mark.slow
def test_radial_training_resumes_bit_identically(corpus, tmp_path, policy, explore):
    """Stop after 3 steps and resume to 6: the same parameters, router included, and the same compute cost (the
    depth target's controller), bit for bit, as 6 steps straight; the log records blocks/token and the cost.
    With exploration, each step's swaps are drawn from (seed, step), so a resume draws them again."""
    from radial_min import data
    from radial_min.io.checkpoint import SafetensorsFile

    _, train_ids, val_streams = corpus
    val = {k: data.validation_sequences(s, 16, 2) for k, s in val_streams.items()}
    run = {"cache_policy": policy, "explore": explore}
    straight = tr.parameters(tr.train(radial_run(tmp_path / "a", 6, **run), train_ids, val, progress=False))
    tr.train(radial_run(tmp_path / "b", 6, **run), train_ids, val, progress=False, stop_after=3)
    resumed = tr.parameters(tr.train(radial_run(tmp_path / "b", 6, **run), train_ids, val, progress=False))
    assert {k for k in straight if k.startswith(tr.ROUTER)} == {"router.w1", "router.b1", "router.w2", "router.b2"}
    for name in straight:
        np.testing.assert_array_equal(resumed[name], straight[name])
    costs = [SafetensorsFile(p / "state.safetensors").metadata["cost"] for p in (tmp_path / "a", tmp_path / "b")]
    assert costs[0] == costs[1] and float(costs[0]) != 0
    log = [json.loads(line) for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6] and all(0 <= r["blocks"] <= 4 for r in log)
    assert log[0]["cost"] == log[2]["cost"] == 0.0 and log[-1]["cost"] != 0  # the controller waits for warm-up
    start = _initial_router(tmp_path / "c", policy)
    assert not np.array_equal(straight["router.w2"], start["router.w2"])  # the router learned after its warm-up


@pytest.mark.slow
def test_cli_trains_a_radial_network_that_generates_routed(capsys, corpus, tmp_path):
    """`train --radial` end to end: the export loads as a RadialNetwork, `generate` routes it by default and prints
    the routing summary, `info` shows the router and the policy; a finished run says so."""
    import cli
    from test_cli import call

    run = tmp_path / "run"
    shutil.copytree(corpus[0], run)  # the prepared tiny corpus
    export = tmp_path / "export"
    size = "--vocab-size 300 --hidden-size 16 --layers 2 --heads 2 --seq-len 16 --batch-size 2".split()
    steps = "--steps 3 --eval-every 3 --warmup 1".split()
    routing = "--radial --target-depth 2 --max-depth 6 --cache-policy global --router-warmup 1".split()
    args = ["train", "--out", run, "--export", export, *size, *steps, *routing]
    code, out, err = call(capsys, *args)
    assert code == 0, err
    assert re.search(r"^held\s+[\d,]+\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+[\d.]+$", out, re.M)  # perplexity and blocks/token
    net = radial_min.load(export)
    assert isinstance(net, RadialNetwork) and net.max_depth == 6 and net.cache_policy == "global"
    code, out, err = call(
        capsys, "generate", "In the", "--model", export, "--max-new-tokens", 4, "--show-depth", "none"
    )
    assert code == 0 and out.startswith("In the") and "[routing: " in err and "KV cache" in err, err
    code, out, _ = call(capsys, "info", "--model", export)
    assert code == 0 and "co-trained router" in out and "global policy, step encodings x1" in out
    code, out, err = call(capsys, "generate", "In", "--model", export, "--router", "weights/opt-kjv-wiki/router-tau0.2")
    assert code == 2 and "was trained with its own router" in err
    code, _, err = call(capsys, *args)
    assert code == 0 and "already finished" in err
    assert cli is not None


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["--cost", 0.1], "--cost: routing options need --radial"),
        (["--radial"], "--radial needs a compute budget"),
        (["--radial", "--cost", 0.1, "--target-depth", 3], "give one"),
        (["--radial", "--target-depth", 3, "--max-depth", 0], "--max-depth: expected an integer >= 1"),
        (
            ["--radial", "--target-depth", 3, "--forward-only", "--max-depth", 20],
            "runs each of its 12 blocks at most once",
        ),
        (["--radial", "--target-depth", 30], "--target-depth 30.0: expected blocks per token in (0, 12]"),
    ],
)
def test_cli_refuses_bad_radial_settings(capsys, tmp_path, args, fragment):
    from test_cli import assert_one_line_error, call

    code, _, err = call(capsys, "train", "--out", tmp_path / "run", *args)
    assert_one_line_error(code, err)
    assert fragment in err and not (tmp_path / "run").exists(), err


# ----------------------------------------------------------------------------------- the shipped network

SHIPPED = "weights/radial-kjv-wiki"  # the co-trained Radial Network docs/cotraining.md trained and ships
PASSAGE = (
    "And God said, Let there be light: and there was light. And God saw the light, that it was good: and God "
    "divided the light from the darkness. And God called the light Day, and the darkness he called Night."
)


def test_the_shipped_co_trained_network_routes_as_it_was_trained():
    """Loaded as users load it, the shipped network is routed by its own router; token by token it gives the
    training forward's logits and routes on a Genesis passage, and it skips blocks there (it was trained for 8 of
    its 12 per token on average)."""
    net = radial_min.load(SHIPPED)
    assert isinstance(net, RadialNetwork) and net.gate
    ids = radial_min.Tokenizer(net.path).encode(PASSAGE)
    logits, routes = training_forward(net, ids)
    net.routes = []
    assert close(net.forward(ids), logits)
    assert net.routes == routes
    depth = np.mean([len(r) for r in routes])
    assert 5 < depth < 11 and len({tuple(r) for r in routes}) > 1, depth  # skips, and not the same for every token

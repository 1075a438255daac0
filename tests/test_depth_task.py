"""tools/depth_task.py's masked loss, the one piece of its training loop that the trainer does not have: its gradient
against finite differences, and with every token weighted it is the trainer's own loss."""

import importlib.util
from pathlib import Path

import numpy as np

from radial_min import opt_backprop as ob
from radial_min import tasks

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("depth_task", ROOT / "tools" / "depth_task.py")
depth_task = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(depth_task)


def test_masked_crossentropy_gradient_and_mask():
    rng = np.random.default_rng(0)
    N, V = 9, 6
    logits = rng.standard_normal((N, V))
    targets = rng.integers(0, V, N)
    weights = np.array([1, 0, 1, 1, 0, 0, 1, 1, 0], float)
    loss, grad = depth_task.masked_crossentropy(logits.copy(), targets, weights)
    nll = -np.log(np.exp(logits) / np.exp(logits).sum(-1, keepdims=True))[np.arange(N), targets]
    assert abs(loss - np.sum(nll * weights) / weights.sum()) < 1e-12
    eps, numeric = 1e-6, np.zeros_like(logits)
    for i in range(N):
        for j in range(V):
            up, down = logits.copy(), logits.copy()
            up[i, j] += eps
            down[i, j] -= eps
            numeric[i, j] = (
                depth_task.masked_crossentropy(up, targets, weights)[0]
                - depth_task.masked_crossentropy(down, targets, weights)[0]
            ) / (2 * eps)
    np.testing.assert_allclose(grad, numeric, atol=1e-8)
    assert np.all(grad[weights == 0] == 0)  # a left-out token sends no gradient


def test_loss_over_every_token_is_the_trainers():
    task = tasks.HopTask(nodes=16, max_hops=3, seq_len=64)
    cfg = depth_task.model_config(task, layers=1, width=32, heads=2)
    params = ob.init_params(cfg, 0)
    tokens, labels = tasks.batch(task, 0, 0, 4)
    loss, grads = depth_task.loss_and_grads(params, cfg, tokens, depth_task.loss_weights(labels, "all"))
    ref_loss, ref_grads = ob.loss_and_grads(params, cfg, tokens)
    assert abs(loss - ref_loss) < 1e-5
    for name, g in ref_grads.items():
        np.testing.assert_allclose(grads[name], g, atol=1e-6, err_msg=name)
    scored = depth_task.loss_weights(labels, "scored")
    assert scored.sum() == tasks.scored_mask(labels).sum() < scored.size

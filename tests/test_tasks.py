"""The variable-depth task (radial_min/tasks.py): streams are pure functions of (seed, index), every label and
answer agrees with a solver written here independently of the generator, accuracies count what they should, and
the saved file reads back or fails with one line naming it."""

import json
from pathlib import Path

import numpy as np
import pytest

from radial_min import tasks
from radial_min.errors import RadialError, SettingError
from radial_min.io.checkpoint import write_safetensors

CONFIGS = [
    tasks.HopTask(),
    tasks.HopTask(nodes=16, max_hops=5, seq_len=64, table="array"),
    tasks.HopTask(nodes=40, max_hops=12, seq_len=128, table="pairs"),
    tasks.HopTask(nodes=20, max_hops=3, seq_len=64, table="pairs", hop_weights=(0, 1, 0, 2)),
    tasks.HopTask(nodes=16, max_hops=6, seq_len=64, starts="random"),
    tasks.HopTask(nodes=24, max_hops=4, seq_len=96, table="pairs", starts="random"),
]


def solve(task: tasks.HopTask, tokens: np.ndarray):
    """Read one sequence as a reader would, without the generator's f: the table from its tokens, then each query
    answered by looking the start node up hop by hop. -> (expected labels, expected answers {position: token})."""
    n, names = task.nodes, task.names()
    assert names[tokens[0]] == "<s>"
    if task.table == "array":
        table = {i: int(tokens[1 + i]) for i in range(n)}
        after = 1 + n
    else:
        body = tokens[1 : 1 + 2 * n]
        table = {int(body[j]): int(body[j + 1]) for j in range(0, 2 * n, 2)}
        after = 1 + 2 * n
    assert sorted(table) == list(range(n)) and sorted(table.values()) == list(range(n))  # a permutation...
    starts = []
    x, seen = 0, set()
    while x not in seen:
        seen.add(x)
        x = table[x]
    assert len(seen) == n  # ... with a single cycle
    assert names[tokens[after]] == "|"
    labels = [tasks.NOISE] * (after + 1)
    labels[after] = 0
    answers = {}
    for pos in range(after + 1, len(tokens)):
        offset = (pos - after - 1) % 3
        if offset == 0:  # the hop token
            hops = int(names[tokens[pos]].lstrip("+"))
            labels.append(tasks.NOISE)
        elif offset == 1:  # the start node: node q for query q, or drawn at random without repeats
            start = int(tokens[pos])
            starts.append(start)
            if task.starts == "ordered":
                assert start == (pos - after - 1) // 3
            labels.append(0 if task.starts == "ordered" else tasks.NOISE)
        else:
            node = start
            for _ in range(hops):
                node = table[node]
            answers[pos] = node
            labels.append(hops)
    assert len(set(starts)) == len(starts) and max(starts) < n  # distinct: no answer repeats an earlier query's
    return np.array(labels), answers


@pytest.mark.parametrize("task", CONFIGS, ids=lambda t: f"{t.table}-{t.starts}-{t.nodes}n-{t.max_hops}h")
def test_labels_and_answers_agree_with_an_independent_solver(task):
    tokens, labels = tasks.batch(task, seed=3, k=5, batch_size=16)
    assert tokens.shape == labels.shape == (16, task.seq_len + 1)
    assert tokens.min() >= 0 and tokens.max() < task.vocab_size <= 64
    for tok, lab in zip(tokens, labels):
        want_labels, answers = solve(task, tok)
        np.testing.assert_array_equal(lab, want_labels)
        assert answers and all(tok[p] == a for p, a in answers.items())


def test_hop_counts_follow_the_weights():
    only3 = tasks.HopTask(nodes=32, max_hops=4, hop_weights=(0, 0, 0, 1, 0))
    _, labels = tasks.batch(only3, 0, 0, 8)
    assert set(np.unique(labels)) == {tasks.NOISE, 0, 3}
    task = tasks.HopTask(nodes=32, max_hops=4)  # uniform over 0..4: each about a fifth of the answers
    tokens, labels = tasks.sequences(task, 0, 0, 400)
    hops = tokens[:, task.query_start :: 3] - task.nodes  # the hop tokens
    freq = np.bincount(hops.ravel(), minlength=5) / hops.size
    assert np.all(np.abs(freq - 0.2) < 0.02), freq
    # 3 of 129 tokens are <s>, separator... : answers are a third of the queries' tokens, no more
    answers = labels[:, task.query_start + 2 :: 3]
    assert np.all(answers >= 0) and (answers >= 1).mean() == pytest.approx(0.8, abs=0.02)


def test_streams_are_pure_functions_of_seed_and_index():
    task = tasks.HopTask()
    a = tasks.batch(task, seed=1, k=7, batch_size=4)
    b = tasks.batch(task, seed=1, k=7, batch_size=4)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    # batch k is sequences k*B .. k*B + B - 1, whatever was drawn before: a resumed run sees the same batch
    tok, _ = tasks.sequences(task, 1, 28, 4)
    np.testing.assert_array_equal(tok, a[0])
    others = [
        tasks.batch(task, 1, 8, 4)[0],  # the next batch
        tasks.batch(task, 2, 7, 4)[0],  # another seed
        tasks.batch(task, 1, 7, 4, stream="eval")[0],  # the held-out stream
    ]
    for o in others:
        assert not np.array_equal(o, a[0])
    assert len({t.tobytes() for t in tasks.sequences(task, 1, 0, 64)[0]}) == 64  # no repeated sequence


def test_accuracy_counts_each_label_and_leaves_noise_out():
    task = tasks.HopTask(nodes=16, max_hops=3, seq_len=64)
    tokens, labels = tasks.batch(task, 0, 0, 3)
    B, T = tokens.shape[0], tokens.shape[1] - 1
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((B, T, task.vocab_size)).astype(np.float32)
    right = rng.random((B, T)) < 0.5  # make the argmax the true next token at these positions, wrong elsewhere
    for b in range(B):
        for t in range(T):
            target = tokens[b, t + 1]
            logits[b, t, target] = 10.0 if right[b, t] else -10.0
    counts = tasks.accuracy_by_label(logits, tokens, labels)
    assert tasks.NOISE not in counts
    for label in range(task.max_hops + 1):
        chosen = labels[:, 1:] == label
        assert counts[label] == (int(right[chosen].sum()), int(chosen.sum()))
    assert sum(n for _, n in counts.values()) == int(tasks.scored_mask(labels).sum())
    total = tasks.add_counts(tasks.add_counts({}, counts), counts)
    assert total[1] == (2 * counts[1][0], 2 * counts[1][1])
    with pytest.raises(SettingError):
        tasks.accuracy_by_label(logits[:, :-1], tokens, labels)


def test_save_read_show_round_trip(tmp_path):
    task = CONFIGS[2]
    tokens, labels = tasks.sequences(task, 0, 0, 5, stream="eval")
    path = tasks.save(tmp_path / "eval.safetensors", task, tokens, labels)
    task2, tok2, lab2 = tasks.read(path)
    assert task2 == task
    np.testing.assert_array_equal(tok2, tokens)
    np.testing.assert_array_equal(lab2, labels)
    text = tasks.show(task, tokens[0], labels[0])
    rows = text.splitlines()
    assert len(rows) == 2 * -(-(task.seq_len + 1) // 16)
    assert rows[0].split()[1] == "<s>" and rows[1].split()[1] == "."
    _, answers = solve(task, tokens[0])
    pos = min(answers)  # the first answer: its name in the token row, its hop count under it
    row, col = divmod(pos, 16)
    assert rows[2 * row].split()[1 + col] == task.names()[answers[pos]]
    assert rows[2 * row + 1].split()[1 + col] == str(labels[0, pos])


def test_bad_files_and_settings_fail_with_one_line(tmp_path):
    task = tasks.HopTask(nodes=16, max_hops=3, seq_len=64)
    tokens, labels = tasks.sequences(task, 0, 0, 2)
    meta = {"format": tasks.FORMAT, "task": json.dumps({"nodes": 16, "max_hops": 3, "seq_len": 64})}
    cases = {
        "format": ({"tokens": tokens, "labels": labels}, {**meta, "format": "other"}),
        "task": ({"tokens": tokens, "labels": labels}, {**meta, "task": '{"nodes": 99}'}),
        "unknown field": ({"tokens": tokens, "labels": labels}, {**meta, "task": '{"colour": 1}'}),
        "labels missing": ({"tokens": tokens}, meta),
        "token out of range": ({"tokens": tokens + task.vocab_size, "labels": labels}, meta),
        "shape": ({"tokens": tokens[:, :-1], "labels": labels[:, :-1]}, meta),
    }
    for name, (tensors, md) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        write_safetensors(path, tensors, md)
        with pytest.raises(RadialError, match=str(path)) as e:
            tasks.read(path)
        assert "\n" not in str(e.value), name
    with pytest.raises(RadialError, match="no such file"):
        tasks.read(tmp_path / "absent.safetensors")
    for bad in ({"nodes": 60, "max_hops": 8}, {"table": "list"}, {"nodes": 8, "seq_len": 128}, {"max_hops": 40},
                {"max_hops": 2, "hop_weights": (1, 1)}, {"max_hops": 2, "hop_weights": (1, -1, 1)}):  # fmt: skip
        with pytest.raises(SettingError, match="HopTask"):
            tasks.HopTask(**bad)


def test_curriculum_lets_in_one_hop_count_at_a_time():
    task = tasks.HopTask(nodes=16, max_hops=4, seq_len=64, hop_weights=(1, 2, 1, 1, 4))
    assert tasks.curriculum(task, 10_000, 0) is task
    for step, top in ((0, 1), (99, 1), (100, 2), (250, 3), (300, 4), (10_000, 4)):
        t = tasks.curriculum(task, step, 100)
        p = t.probabilities()
        assert np.all(p[top + 1 :] == 0) and np.all(p[: top + 1] > 0), (step, p)
        np.testing.assert_allclose(
            p[: top + 1], task.probabilities()[: top + 1] / task.probabilities()[: top + 1].sum()
        )
        _, labels = tasks.batch(t, 0, step, 8)
        assert labels.max() <= top
    assert tasks.curriculum(task, 300, 100) == task  # from the last opening on, the task itself


# ------------------------------------------------------------------------------------------------ training on it

SMALL = tasks.HopTask(nodes=6, max_hops=2, seq_len=22)


def small_config(tmp_path, **kw):
    from radial_min import train as tr

    flat = dict(vocab_size=SMALL.vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                seq_len=SMALL.seq_len, batch_size=8, steps=40, lr=1e-2, warmup=5, eval_every=20, save_every=40,
                out=str(tmp_path / "run"), task="hop:nodes=6,max_hops=2")  # fmt: skip
    return tr.TrainConfig.of(**{**flat, **kw})


def test_stream_batches_and_loss_masks():
    stream = tasks.HopStream(SMALL, seed=3, batch_size=5, curriculum=10)
    tokens, mask = stream.batch(4)
    ref_tokens, ref_labels = tasks.batch(tasks.curriculum(SMALL, 4, 10), 3, 4, 5)
    np.testing.assert_array_equal(tokens, ref_tokens)
    assert ref_labels.max() == 1  # the curriculum's first stage: up to 1 hop
    assert mask.shape == (5, SMALL.seq_len) and mask.dtype == np.float32
    np.testing.assert_array_equal(mask, (ref_labels[:, 1:] != tasks.NOISE).astype(np.float32))
    assert 0 < mask.sum() < mask.size
    _, every = tasks.HopStream(SMALL, 3, 5, 10, loss="all").batch(4)
    assert every.shape == mask.shape and np.all(every == 1)


@pytest.mark.slow
def test_masked_loss_is_the_mean_over_the_mask():
    """The one trainer's loss with a task's mask is the mean NLL over the scored targets, and its gradient is that
    loss's: a step along it changes the masked loss by what the gradient says (a directional finite difference)."""
    from radial_min import train as tr

    net = tr.build_network(small_config(Path(".")))
    tokens, mask = tasks.HopStream(SMALL, 0, 4).batch(0)
    loss, grads, _ = tr.loss_and_grads(net, tokens, mask=mask)
    z = net.forward(tokens[:, :-1]).reshape(*mask.shape, -1).astype(np.float64)  # [B, T, V]
    z -= z.max(-1, keepdims=True)
    nll = np.log(np.exp(z).sum(-1)) - np.take_along_axis(z, tokens[:, 1:, None], -1)[..., 0]  # [B, T]
    assert abs(loss - (nll * mask).sum() / mask.sum()) < 1e-5
    assert abs(loss - nll.mean()) > 1e-3  # the mask matters on this batch
    _, every, _ = tr.loss_and_grads(net, tokens)
    params = tr.parameters(net)
    name = "decoder.layers.0.fc2.weight"
    g = grads[name].astype(np.float64)
    assert not np.allclose(g, every[name], atol=1e-7)
    eps, w = 1e-2 / np.linalg.norm(g), params[name].copy()
    losses = []
    for sign in (1, -1):
        params[name][...] = w + sign * eps * g
        losses.append(tr.loss_and_grads(net, tokens, mask=mask, need_grads=False)[0])
    params[name][...] = w
    assert (losses[0] - losses[1]) / (2 * eps) == pytest.approx(float((g * g).sum()), rel=2e-2)


@pytest.mark.slow
def test_a_tiny_model_learns_the_task_through_the_trainer(tmp_path):
    """train.train on a HopStream: its first logged loss is the masked loss of batch 0 at init, and 40 steps
    cut the training loss and solve the easy tokens."""
    from radial_min import train as tr

    cfg = small_config(tmp_path)
    stream = tasks.HopStream(SMALL, cfg.run.seed, cfg.run.batch_size)
    tokens, labels = tasks.sequences(SMALL, 0, 0, 32, stream="eval")
    tokens0, mask0 = stream.batch(0)
    first = tr.loss_and_grads(tr.build_network(cfg), tokens0, mask=mask0, need_grads=False)[0]
    net = tr.train(cfg, stream, {"hop": tokens}, progress=False)
    log = tr.read_log(cfg.run.out)
    assert log[0]["loss"] == pytest.approx(first, abs=2e-4)
    rep = tasks.score(net, tokens, labels)
    assert rep["accuracy"]["0"] > 0.9 and rep["blocks"]["0"] == 2.0 and rep["blocks_per_token"] == 2.0
    assert np.mean([r["loss"] for r in log[-5:]]) < 0.6 * log[0]["loss"]


class _Oracle:
    """A stand-in network for `score`: right on every target whose position (0-based, among the targets) is even,
    wrong on the rest, and position t runs t + 1 blocks."""

    def __init__(self, tokens):
        self.tokens, self.last_walk = tokens, None

    def forward(self, ids):
        B, T = ids.shape
        rows = {tuple(r[:-1]): r[1:] for r in self.tokens}
        targets = np.stack([rows[tuple(r)] for r in ids])  # [B, T]
        guess = np.where(np.arange(T) % 2 == 0, targets, (targets + 1) % SMALL.vocab_size)
        self.last_walk = type("Walk", (), {"depth": np.tile(np.arange(1, T + 1), B)})()
        return np.eye(SMALL.vocab_size, dtype=np.float32)[guess].reshape(B * T, -1)


def test_score_counts_accuracy_and_blocks_per_label():
    tokens, labels = tasks.sequences(SMALL, 0, 0, 9, stream="eval")
    rep = tasks.score(_Oracle(tokens), tokens, labels, batch_size=4)
    target_labels = labels[:, 1:]
    position = np.broadcast_to(np.arange(SMALL.seq_len), target_labels.shape)
    for label in ("0", "1", "2"):
        chosen = target_labels == int(label)
        assert rep["scored"][label] == chosen.sum() > 0
        assert rep["accuracy"][label] == pytest.approx(np.mean(position[chosen] % 2 == 0))
        assert rep["blocks"][label] == pytest.approx(np.mean(position[chosen] + 1))
    assert rep["blocks_per_token"] == pytest.approx((SMALL.seq_len + 1) / 2)
    assert "-1" not in rep["accuracy"] and "-1" not in rep["blocks"]


def _brute_spearman(x, y):
    """Spearman's rho by its definition: Pearson's r of mid-ranks, each rank counted from scratch."""
    rank = lambda a: np.array([np.sum(a < v) + (np.sum(a == v) + 1) / 2 for v in a])  # noqa: E731
    return np.corrcoef(rank(np.asarray(x, float)), rank(np.asarray(y, float)))[0, 1]


def test_depth_follows_difficulty_pairs_each_token_with_the_position_that_predicts_it():
    N = tasks.NOISE
    labels = np.array([[N, 0, N, 2, 1, 0], [N, N, 1, 0, 2, N]])  # [B, T + 1]: label of token t
    # blocks run at input position t = 1 + the label of token t + 1 (the token it predicts); NOISE targets get 9
    depth = np.array([[1, 9, 3, 2, 1], [9, 2, 1, 3, 9]])  # [B, T]
    blocks, required = tasks.scored_depths(depth, labels)
    assert sorted(zip(required, blocks)) == [(0, 1), (0, 1), (0, 1), (1, 2), (1, 2), (2, 3), (2, 3)]
    rep = tasks.depth_follows_difficulty(blocks, required)
    assert rep["spearman"] == pytest.approx(1.0)
    assert rep["hard_easy_blocks"] == pytest.approx(3.0)
    # read one position off (the label of the input token, not of the predicted one), it would not be 1
    shifted = labels[:, :-1] != N
    assert _brute_spearman(depth[shifted], labels[:, :-1][shifted]) < 0.5
    with pytest.raises(SettingError, match="depth"):
        tasks.scored_depths(depth.T, labels)


def test_spearman_ranks_ties_by_their_mean_and_is_none_for_a_constant_depth():
    rep = tasks.depth_follows_difficulty(np.array([1.0, 2, 2, 3]), np.array([0.0, 0, 1, 1]))
    assert rep["spearman"] == pytest.approx(3 / np.sqrt(18))  # mid-ranks [1, 2.5, 2.5, 4] against [1.5, 1.5, 3.5, 3.5]
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 5, 200).astype(float), rng.integers(0, 3, 200).astype(float)
    x += y  # correlated, with many ties
    assert tasks.depth_follows_difficulty(x, y)["spearman"] == pytest.approx(_brute_spearman(x, y))
    flat = tasks.depth_follows_difficulty(np.full(4, 8.0), np.array([0.0, 1, 2, 2]))
    assert flat["spearman"] is None and flat["hard_easy_blocks"] == pytest.approx(1.0)


def test_score_reports_whether_depth_follows_difficulty():
    tokens, labels = tasks.sequences(SMALL, 0, 0, 9, stream="eval")
    rep = tasks.score(_Oracle(tokens), tokens, labels, batch_size=4)
    target_labels = labels[:, 1:]
    position = np.broadcast_to(np.arange(SMALL.seq_len), target_labels.shape)
    chosen = target_labels != tasks.NOISE
    assert rep["spearman"] == pytest.approx(_brute_spearman(position[chosen] + 1, target_labels[chosen]))
    hardest = target_labels == target_labels.max()
    easy = target_labels == 0
    assert rep["hard_easy_blocks"] == pytest.approx((position[hardest] + 1).mean() / (position[easy] + 1).mean())

"""The variable-depth task (radial_min/tasks.py): streams are pure functions of (seed, index), every label and
answer agrees with a solver written here independently of the generator, accuracies count what they should, and
the saved file reads back or fails with one line naming it."""

import json

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

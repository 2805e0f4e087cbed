"""predict --group's streaming means (trainer.predict.GroupMeans): every group once, its mean over exactly
its own images, emitted as soon as it is complete, with batches interleaved from several workers."""

from __future__ import annotations

import torch

from trainer.predict import GroupMeans


def test_every_group_once_with_the_mean_of_its_own_rows_and_early() -> None:
    # two workers, each reading its own range; batch i comes from worker i % 2 (the DataLoader's order)
    worker_batches = {0: [["a", "a", "b"], ["b", "c", "c"], ["f"]], 1: [["d", "d", "d"], ["e", "g", "g"], ["h"]]}
    order = [worker_batches[i % 2][i // 2] for i in range(6)]
    rows = {}
    means = GroupMeans(workers=2)
    emitted: list[tuple[int, str]] = []
    got = {}
    generator = torch.Generator().manual_seed(0)
    for index, groups in enumerate(order):
        probs = torch.rand(len(groups), 3, generator=generator)
        for group, row in zip(groups, probs):
            rows.setdefault(group, []).append(row)
        for group, mean in means.add(index, groups, probs):
            emitted.append((index, group))
            got[group] = mean
    for group, mean in means.rest():
        emitted.append((len(order), group))
        got[group] = mean
    assert sorted(g for _, g in emitted) == sorted(rows)  # every group exactly once
    for group, mean in got.items():
        assert torch.allclose(mean, torch.stack(rows[group]).mean(0)), group
    early = {g: i for i, g in emitted if i < len(order)}
    # complete once their worker has yielded a later batch without them (c at batch 4, e and g at 5); groups
    # met in a worker's first batch (a, b, d) may continue the previous worker's range: held to the end
    assert early == {"c": 4, "e": 5, "g": 5}

"""Ground-truth labels (SPEC.md §4.3): the top-K valid slots by priority, ties by slot order,
shared by the losses and the metrics."""

from __future__ import annotations

import pytest
import torch

from raytopk.data.labels import ground_truth


def test_ground_truth_ties_by_slot_order_and_masks() -> None:
    prio = torch.tensor(
        [
            [5.0, 7.0, 7.0, 9.0, 7.0, 1.0],
            [5.0, 7.0, 7.0, 9.0, 7.0, 1.0],
            [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
        ]
    )
    mask = torch.tensor(
        [[True] * 6, [True, True, False, False, True, True], [False, True, False, True, True, True]]
    )
    g = ground_truth(prio, mask, k=3)
    expect = torch.tensor(
        [
            [False, True, True, True, False, False],  # 9, then the first two 7s
            [True, True, False, False, True, False],  # valid 5,7,7,1 -> 7,7,5
            [False, True, False, True, True, False],  # all tied: first three valid slots
        ]
    )
    assert torch.equal(g, expect)
    few = ground_truth(prio[1:2], mask[1:2], k=10)  # fewer valid slots than k: all of them
    assert torch.equal(few, mask[1:2])
    with pytest.raises(ValueError, match="'mask' should be a bool tensor"):
        ground_truth(prio, mask.float(), 3)


def test_ground_truth_errors_name_the_argument() -> None:
    prio = torch.tensor([[3.0, 1.0, 2.0]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"'priority' should have shape \(B, N\) but got \(3,\)"):
        ground_truth(prio[0], mask[0], 1)
    with pytest.raises(ValueError, match="'k' should be >= 1 but got 0"):
        ground_truth(prio, mask, 0)
    assert torch.equal(ground_truth(prio, mask, 2), torch.tensor([[True, False, True]]))

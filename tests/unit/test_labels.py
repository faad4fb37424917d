"""Ground-truth labels (docs/protocol.md §4.3): the label mass of the top-K own valid slots by
priority; slots tied at the K-th priority share the remaining mass; sampled negatives are never
positives. One rule shared by the losses and the metrics."""

from __future__ import annotations

import pytest
import torch

from raytopk.data.labels import ground_truth, num_positives


def test_ties_at_the_kth_priority_share_the_remaining_mass() -> None:
    prio = torch.tensor(
        [
            [5.0, 7.0, 7.0, 9.0, 7.0, 1.0],
            [5.0, 7.0, 7.0, 9.0, 7.0, 1.0],
            [6.0, 6.0, 6.0, 6.0, 6.0, 6.0],
            [9.0, 8.0, 7.0, 7.0, 6.0, 5.0],
        ]
    )
    mask = torch.tensor(
        [
            [True] * 6,
            [True, True, False, False, True, True],
            [False, True, False, True, True, True],
            [True] * 6,
        ]
    )
    y = ground_truth(prio, mask, k=3)
    third = 2.0 / 3.0
    expect = torch.tensor(
        [
            [0.0, third, third, 1.0, third, 0.0],  # 9, then three 7s share 2 positions
            [1.0, 1.0, 0.0, 0.0, 1.0, 0.0],  # valid 5,7,7,1 -> 7,7,5: no tie at the 3rd
            [0.0, 0.75, 0.0, 0.75, 0.75, 0.75],  # four valid slots all tied: 3/4 each
            [1.0, 1.0, 0.5, 0.5, 0.0, 0.0],  # the tie block straddles rank 3
        ]
    )
    torch.testing.assert_close(y, expect)
    torch.testing.assert_close(y.sum(-1), torch.full((4,), 3.0))  # Σ y = k per row
    assert (y[~mask] == 0).all()


def test_sampled_negatives_are_never_positives_per_row_k() -> None:
    # Row 0: 2 own valid slots + 4 sampled negatives (priority 0): k_b = 2, not 3.
    # Row 1: own slots 30, 5 (one masked), sampled ones: only the own valid slots are positives.
    # Row 2: no own valid slot: no positive at all.
    prio = torch.tensor(
        [
            [30.0, 7.0, 0.0, 0.0, 0.0, 0.0],
            [30.0, 5.0, 7.0, 0.0, 0.0, 0.0],
            [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
        ]
    )
    mask = torch.tensor(
        [[True] * 6, [True, True, False, True, True, True], [True] * 6]
    )
    y = ground_truth(prio, mask, k=3)
    torch.testing.assert_close(
        y,
        torch.tensor(
            [[1.0, 1.0, 0, 0, 0, 0], [1.0, 1.0, 0, 0, 0, 0], [0.0, 0, 0, 0, 0, 0]]
        ),
    )
    assert num_positives(prio, mask, 3).tolist() == [2, 2, 0]
    assert num_positives(prio, mask, 1).tolist() == [1, 1, 0]
    with pytest.raises(ValueError, match="'mask' should be a bool tensor"):
        ground_truth(prio, mask.float(), 3)


def test_ground_truth_errors_name_the_argument() -> None:
    prio = torch.tensor([[3.0, 1.0, 2.0]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"'priority' should have shape \(B, N\) but got \(3,\)"):
        ground_truth(prio[0], mask[0], 1)
    with pytest.raises(ValueError, match="'k' should be >= 1 but got 0"):
        ground_truth(prio, mask, 0)
    assert torch.equal(ground_truth(prio, mask, 2), torch.tensor([[1.0, 0.0, 1.0]]))
    assert ground_truth(prio.double(), mask, 2).dtype == torch.float64

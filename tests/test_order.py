"""The data order is a pure function of (seed, step): permutations per epoch, full batches only, flips
drawn with the order."""

import pytest
import torch

from ddpm.data.order import BatchSampler, DataOrder, apply_flips


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def test_each_epoch_is_a_permutation_of_full_batches():
    order = DataOrder(n_images=10, batch_size=3, seed=0, hflip=False)
    assert order.per_epoch == 3  # the 10th image waits for another epoch
    index, flips = order.epoch(0)
    assert index.shape == (3, 3) and len(set(index.flatten().tolist())) == 9
    assert not flips.any()


def test_the_order_depends_on_seed_and_epoch_only():
    a, b = DataOrder(100, 10, 0, True), DataOrder(100, 10, 0, True)
    assert all(torch.equal(x, y) for x, y in zip(a.epoch(3), b.epoch(3), strict=True))
    assert not torch.equal(a.epoch(3)[0], a.epoch(4)[0])
    assert not torch.equal(a.epoch(3)[0], DataOrder(100, 10, 1, True).epoch(3)[0])


def test_starting_at_a_step_continues_the_same_sequence():
    order = DataOrder(50, 8, 5, True)  # 6 batches an epoch: 20 steps cross three epoch boundaries
    whole = take(order.steps(0), 20)
    for start in (1, 6, 13):
        later = take(order.steps(start), 20 - start)
        for (i, f), (j, g) in zip(whole[start:], later, strict=True):
            assert torch.equal(i, j) and torch.equal(f, g)
    assert order.position(13) == (2, 1)


def test_batch_sampler_yields_the_indices_of_the_order():
    order = DataOrder(20, 4, 0, False)
    sampler = iter(BatchSampler(order, start=3))
    assert take(sampler, 2) == [index.tolist() for index, _ in take(order.steps(3), 2)]


def test_flips_mirror_exactly_the_marked_images():
    x = torch.arange(2 * 1 * 2 * 3, dtype=torch.float32).reshape(2, 1, 2, 3)
    out = apply_flips(x, torch.tensor([True, False]))
    assert torch.equal(out[0], x[0].flip(-1)) and torch.equal(out[1], x[1])
    assert apply_flips(x, torch.tensor([False, False])) is x


def test_hflip_flips_about_half():
    flips = DataOrder(1000, 100, 0, True).epoch(0)[1]
    assert 400 < int(flips.sum()) < 600


def test_too_few_images_for_a_batch():
    with pytest.raises(ValueError, match="3 images cannot fill a batch of 4"):
        DataOrder(3, 4, 0, False)

"""``--batch-size auto`` (bench.autobatch): parsing, the throughput search on the CPU, the even split."""
from __future__ import annotations

import time

import pytest
import torch

import solvers
from bench import autobatch
from solvers import schedules


# -- bench.autobatch -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [("auto", "auto"), ("AUTO", "auto"), (" auto ", "auto"), ("16", 16),
                                            (16, 16), ("1", 1), (" 8 ", 8)])
def test_parse_batch_size(text, expected):
    assert autobatch.parse_batch_size(text) == expected


@pytest.mark.parametrize("text", ["0", "-3", "x", "", "1.5", "16x", 0, -2, "autox"])
def test_parse_batch_size_refuses(text):
    with pytest.raises(ValueError, match="positive integer or 'auto'"):
        autobatch.parse_batch_size(text)


class SleepNet:
    """A fake network whose call takes ``cost(batch)`` seconds; records the batch sizes it saw."""

    def __init__(self, cost):
        self.cost = cost
        self.batches: list[int] = []

    def __call__(self, x, t):
        self.batches.append(x.shape[0])
        time.sleep(self.cost(x.shape[0]))
        return torch.zeros_like(x)


def _sleep_model(cost):
    net = SleepNet(cost)
    return solvers.DiffusionModel(net, schedule=schedules.VPLinear(), prediction="eps"), net


@pytest.mark.parametrize("cap", [64, 50])
def test_auto_batch_on_cpu_takes_the_cap_when_a_call_costs_the_same_at_any_batch(single_thread, cap):
    model, net = _sleep_model(lambda n: 0.005)
    chosen = autobatch.auto_batch_size(model, (2,), "cpu", cap=cap)
    assert chosen.batch_size == cap
    assert max(net.batches) == cap
    assert "on cpu" in chosen.note and f"{cap}:" in chosen.note


def test_auto_batch_on_cpu_stops_where_throughput_stops_growing(single_thread):
    model, net = _sleep_model(lambda n: 2e-4 * max(n, 16))  # fixed cost up to 16 samples, then linear
    chosen = autobatch.auto_batch_size(model, (2,), "cpu", cap=4096)
    assert 16 <= chosen.batch_size <= 64, chosen.note
    assert max(net.batches) <= 256, chosen.note  # two doublings without gain end the search


def test_auto_batch_on_cpu_stops_when_a_call_exceeds_the_budget(single_thread):
    model, net = _sleep_model(lambda n: 0.005 * n)
    chosen = autobatch.auto_batch_size(model, (2,), "cpu", cap=4096, cpu_call_budget_s=0.02)
    assert chosen.batch_size <= 8 and max(net.batches) <= 8, chosen.note


def test_auto_batch_never_exceeds_the_cap_and_checks_its_arguments(single_thread):
    model, net = _sleep_model(lambda n: 0.0)
    assert autobatch.auto_batch_size(model, (2,), "cpu", cap=1).batch_size == 1
    assert set(net.batches) == {1}
    chosen = autobatch.auto_batch_size(model, (2,), "cpu", cap=3)
    assert 1 <= chosen.batch_size <= 3 and max(net.batches) <= 3
    for cap in (0, -1):
        with pytest.raises(ValueError, match="cap must be positive"):
            autobatch.auto_batch_size(model, (2,), "cpu", cap=cap)
    for fraction in (0.0, 1.5):
        with pytest.raises(ValueError, match="memory_fraction"):
            autobatch.auto_batch_size(model, (2,), "cpu", cap=4, memory_fraction=fraction)


@pytest.mark.parametrize("total, most, expected", [(1001, 1000, 501), (50_000, 4096, 3847), (10, 64, 10),
                                                   (300, 128, 100), (1024, 1024, 1024), (7, 1, 1)])
def test_auto_batch_splits_the_samples_evenly(total, most, expected):
    """The auto batch is at most the memory bound and splits the samples into batches of (nearly) one size."""
    n = autobatch._even(total, most)
    assert n == expected and n <= most
    batches = -(-total // n)
    assert batches == -(-total // most)           # no more batches than the bound needs
    assert total - (batches - 1) * n >= n - batches  # the last batch is not short by more than the rounding

"""ode_error's exact solutions are solved once per (grid start, grid end) and reused only for that range."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

import pretrained
import solvers
from bench.references import Evaluator


def test_each_grid_range_is_scored_against_its_own_exact_solution():
    card = pretrained.get_card("gmm2d")
    said = []
    ev = Evaluator(card, ["ode_error"], cfg=None, device="cpu", dist=SimpleNamespace(main=True), progress=False,
                   say=said.append)
    schedule = pretrained.load("gmm2d").schedule
    x_T = solvers.initial_noise((16, 2), seeds=range(16), schedule=schedule, dtype=torch.float64)
    ranges = [(1.0, 0.5), (1.0, 0.2), (0.8, 0.2), (1.0, 0.5)]   # the same start twice, the same end twice, a repeat
    for t_from, t_to in ranges:
        cell = SimpleNamespace(deterministic=True, grid=[t_from, (t_from + t_to) / 2, t_to])
        got = ev.whole_cell_features(cell, x_T, x_T, None, None)["ode_error"]
        exact = card.exact_ode(x_T, t_from, t_to).reshape(16, -1).numpy()
        np.testing.assert_allclose(got, ((x_T.numpy() - exact) ** 2).mean(axis=1), rtol=1e-12)
    assert len(said) == 3                                          # solved once per distinct range

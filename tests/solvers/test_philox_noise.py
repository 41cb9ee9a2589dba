"""Counter-based Philox noise (``rng="philox"``): the generator against Random123's known answers and a scalar
reference, its per-seed streams, and ``solvers.sample(..., rng="philox")`` — CPU only, tiny sizes."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

import pretrained
import solvers
from solvers import noise as N
from solvers import schedules

M32 = 0xFFFFFFFF


# -- Philox4x32-10 ---------------------------------------------------------------------------------------------
def philox_reference(counter, key, rounds: int = 10) -> tuple[int, int, int, int]:
    """Philox4x32-``rounds`` on plain Python ints (Salmon et al. 2011 / Random123), one counter at a time."""
    c0, c1, c2, c3 = (int(v) for v in counter)
    k0, k1 = (int(v) for v in key)
    for _ in range(rounds):
        p0 = 0xD2511F53 * c0
        p1 = 0xCD9E8D57 * c2
        c0, c1, c2, c3 = ((p1 >> 32) ^ c1 ^ k0) & M32, p1 & M32, ((p0 >> 32) ^ c3 ^ k1) & M32, p0 & M32
        k0 = (k0 + 0x9E3779B9) & M32
        k1 = (k1 + 0xBB67AE85) & M32
    return c0, c1, c2, c3


# Random123's kat_vectors for philox4x32 with 10 rounds: (counter, key, output).
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((M32, M32, M32, M32), (M32, M32), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


def _philox_torch(counter, key, rounds=10):
    words = N.philox4x32([torch.as_tensor(c, dtype=torch.int64) for c in counter],
                         [torch.as_tensor(k, dtype=torch.int64) for k in key], rounds=rounds)
    return tuple(int(w) for w in words)


@pytest.mark.parametrize("counter, key, expected", PHILOX_KAT, ids=["zeros", "ones", "pi"])
def test_philox_matches_random123_known_answers(counter, key, expected):
    assert _philox_torch(counter, key) == expected
    assert philox_reference(counter, key) == expected  # the test's own reference is right too


def test_philox_vectorised_matches_a_scalar_reference_on_random_inputs():
    rng = random.Random(1234)
    n = 300
    ctr = [[rng.getrandbits(32) for _ in range(n)] for _ in range(4)]
    key = [[rng.getrandbits(32) for _ in range(n)] for _ in range(2)]
    # edge values: the largest words, where a 32-bit product overflows int64 if done naively
    for i, v in enumerate((M32, M32 - 1, 1 << 31, 0xFFFF0000, 0x0000FFFF)):
        for w in ctr + key:
            w[i] = v
    for rounds in (10, 7):
        got = N.philox4x32([torch.tensor(c, dtype=torch.int64) for c in ctr],
                           [torch.tensor(k, dtype=torch.int64) for k in key], rounds=rounds)
        got = torch.stack(got, dim=1)
        assert got.dtype == torch.int64 and got.shape == (n, 4)
        assert int(got.min()) >= 0 and int(got.max()) <= M32
        expected = [philox_reference([c[i] for c in ctr], [k[i] for k in key], rounds) for i in range(n)]
        assert got.tolist() == [list(e) for e in expected]


def test_philox_broadcasts_counters_against_keys():
    j = torch.arange(6, dtype=torch.int64).unsqueeze(0)          # (1, 6) counters
    k0 = torch.tensor([[3], [0xDEADBEEF]], dtype=torch.int64)     # (2, 1) keys
    k1 = torch.tensor([[5], [M32]], dtype=torch.int64)
    zero = torch.zeros((), dtype=torch.int64)
    words = N.philox4x32((j, torch.full((), 9, dtype=torch.int64), zero, zero), (k0, k1))
    assert all(w.shape == (2, 6) for w in words)
    for r in range(2):
        for c in range(6):
            assert tuple(int(w[r, c]) for w in words) == philox_reference(
                (c, 9, 0, 0), (int(k0[r, 0]), int(k1[r, 0])))


# -- PhiloxStreams -----------------------------------------------------------------------------------------------
def test_philox_streams_row_depends_on_its_own_seed_only():
    for shape in [(3, 4), (5,), (1, 7, 3), (64,)]:
        alone = N.PhiloxStreams([7], 1).randn(shape, dtype=torch.float64)
        for seeds in ([5, 7], [7, 5, 3], [1, 2, 3, 4, 5, 6, 7], [7] * 9):
            batch = N.PhiloxStreams(seeds, 1).randn(shape, dtype=torch.float64)
            assert batch.shape == (len(seeds), *shape)
            for i, s in enumerate(seeds):
                if s == 7:
                    torch.testing.assert_close(batch[i], alone[0], rtol=0, atol=0)
    # and so through successive draws
    a, b = N.PhiloxStreams([5, 7], 1), N.PhiloxStreams([7], 1)
    for _ in range(3):
        torch.testing.assert_close(a.randn((10,), dtype=torch.float64)[1], b.randn((10,), dtype=torch.float64)[0],
                                   rtol=0, atol=0)


def test_philox_streams_are_deterministic_and_distinct():
    s = N.PhiloxStreams([0, 1], 1)
    first, second = s.randn((16,)), s.randn((16,))
    assert s.draws == 2
    assert not torch.equal(first, second)                     # successive draws differ
    assert not torch.equal(first[0], first[1])                # seeds differ
    again = N.PhiloxStreams([0, 1], 1)
    assert torch.equal(again.randn((16,)), first) and torch.equal(again.randn((16,)), second)  # reproducible
    other_stream = N.PhiloxStreams([0, 1], 0).randn((16,))
    assert not torch.equal(other_stream, first)               # stream 0 (x_T) ≠ stream 1 (solver noise)
    # the torch generators are a different generator
    assert not torch.equal(N.SeedStreams([0, 1], 1).randn((16,)), first)


def test_philox_streams_dtypes_and_devices():
    ref = N.PhiloxStreams([3, 4], 1).randn((2, 5), dtype=torch.float64)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        z = N.PhiloxStreams([3, 4], 1).randn((2, 5), dtype=dtype)
        assert z.dtype == dtype and z.shape == (2, 2, 5)
        torch.testing.assert_close(z, ref.to(dtype), rtol=0, atol=0)  # one float64 draw, rounded
    assert N.PhiloxStreams([3, 4], 1).randn((2, 5)).dtype == torch.float32  # default
    z = N.PhiloxStreams([3, 4], 1).randn((2, 5), dtype=torch.float64, device=torch.device("cpu"))
    assert z.device.type == "cpu" and torch.equal(z, ref)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 6, 7, 9, 13])
def test_philox_streams_odd_sizes(n):
    s = N.PhiloxStreams([11, 12], 1)
    z = s.randn((n,), dtype=torch.float64)
    assert z.shape == (2, n) and torch.isfinite(z).all()
    # element j is a function of (seed, stream, draw, j): a shorter draw is a prefix of a longer one
    longer = N.PhiloxStreams([11, 12], 1).randn((n + 8,), dtype=torch.float64)
    assert torch.equal(z, longer[:, :n])
    # and the shape only arranges the elements
    if n % 3 == 0:
        assert torch.equal(N.PhiloxStreams([11, 12], 1).randn((3, n // 3), dtype=torch.float64).reshape(2, n), z)


def test_philox_normals_have_the_right_distribution():
    from scipy import stats

    z = N.PhiloxStreams(range(10), 1).randn((10_000,), dtype=torch.float64).reshape(-1).numpy()
    n = z.size
    assert n == 100_000
    assert abs(z.mean()) < 5 / np.sqrt(n)
    assert abs(z.var() - 1) < 5 * np.sqrt(2 / n)
    assert abs(stats.skew(z)) < 5 * np.sqrt(6 / n) and abs(stats.kurtosis(z)) < 5 * np.sqrt(24 / n)
    assert stats.kstest(z, "norm").pvalue > 1e-4
    # Box–Muller pairs (cos, sin of one radius) and neighbouring blocks are uncorrelated
    for lag in (1, 2, 4):
        r = np.corrcoef(z[:-lag], z[lag:])[0, 1]
        assert abs(r) < 5 / np.sqrt(n), (lag, r)
    # the four words of a block each give a normal
    for lane in range(4):
        assert abs(z[lane::4].var() - 1) < 5 * np.sqrt(2 / (n / 4)), lane
    # 32-bit uniforms: |z| ≤ √(−2 log 2⁻³²)
    assert np.abs(z).max() <= np.sqrt(-2 * np.log(2.0 ** -32)) + 1e-12
    # different seeds are uncorrelated
    rows = N.PhiloxStreams(range(2), 1).randn((50_000,), dtype=torch.float64).numpy()
    assert abs(np.corrcoef(rows[0], rows[1])[0, 1]) < 5 / np.sqrt(50_000)


def test_make_streams_picks_the_generator():
    assert isinstance(N.make_streams([0, 1], 1, "torch"), N.SeedStreams)
    assert isinstance(N.make_streams([0, 1], 1, "philox"), N.PhiloxStreams)
    assert isinstance(N.make_streams([0, 1], 1), N.SeedStreams)  # default
    with pytest.raises(ValueError, match="unknown rng 'mt19937'; valid: torch, philox"):
        N.make_streams([0, 1], 1, "mt19937")
    assert N.RNGS == ("torch", "philox")


def test_initial_noise_with_philox():
    x = solvers.initial_noise((4, 3, 2), seeds=[8, 9, 10, 11], rng="philox", dtype=torch.float64)
    assert x.shape == (4, 3, 2) and x.dtype == torch.float64
    assert torch.equal(x, N.PhiloxStreams([8, 9, 10, 11], N.STREAM_INITIAL).randn((3, 2), dtype=torch.float64))
    assert torch.equal(x, solvers.initial_noise((4, 3, 2), seeds=[8, 9, 10, 11], rng="philox", dtype=torch.float64))
    # batch invariance
    assert torch.equal(x[2:3], solvers.initial_noise((1, 3, 2), seeds=[10], rng="philox", dtype=torch.float64))
    # not the torch generators' numbers
    assert not torch.equal(x, solvers.initial_noise((4, 3, 2), seeds=[8, 9, 10, 11], dtype=torch.float64))
    # scaled by the prior's std (σ_max on EDM)
    edm = schedules.EDM()
    scaled = solvers.initial_noise((4, 3, 2), seeds=[8, 9, 10, 11], rng="philox", schedule=edm, dtype=torch.float64)
    torch.testing.assert_close(scaled, x * float(edm.prior_std(edm.t_max)), rtol=1e-15, atol=0)
    assert float(edm.prior_std(edm.t_max)) > 10
    with pytest.raises(ValueError, match="unknown rng"):
        solvers.initial_noise((2, 3), rng="nope")


# -- solvers.sample(..., rng="philox") ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def gmm():
    return pretrained.get_card("gmm"), pretrained.load("gmm")


def _row_model(gmm, make_row_by_row):
    """gmm's exact network evaluated row by row: batch-invariant by construction."""
    m = gmm[1]
    return solvers.DiffusionModel(make_row_by_row(m.fn), schedule=m.schedule, prediction=m.prediction)


@pytest.mark.parametrize("solver", ["ddpm", "euler_maruyama"])
def test_sample_with_philox_is_batch_invariant_and_deterministic(gmm, make_row_by_row, solver):
    card, _ = gmm
    model = _row_model(gmm, make_row_by_row)
    shape = tuple(card.sample_shape)

    def run(seeds, rng="philox"):
        x = solvers.initial_noise((len(seeds), *shape), seeds, schedule=model.schedule, dtype=torch.float64, rng=rng)
        return solvers.sample(model, x, solver=solver, steps=4, seeds=seeds, rng=rng).samples

    a = run([3, 10, 11])
    b = run([10])
    c = run([11, 42, 10, 3])
    assert torch.isfinite(a).all()
    assert torch.equal(a[1], b[0]) and torch.equal(a[1], c[2])
    assert torch.equal(a[0], c[3]) and torch.equal(a[2], c[0])
    assert torch.equal(run([3, 10, 11]), a)                        # the same on every call
    assert not torch.equal(a[0], a[1])
    torch_rng = run([3, 10, 11], rng="torch")
    assert not torch.equal(torch_rng, a)


def test_sample_philox_changes_only_the_solver_noise(gmm, make_row_by_row, monkeypatch):
    card, _ = gmm
    model = _row_model(gmm, make_row_by_row)
    seeds = [0, 1, 2]
    x = solvers.initial_noise((3, *card.sample_shape), seeds, schedule=model.schedule, dtype=torch.float64)
    # the same x_T, only the solver's noise generator changes
    torch_res = solvers.sample(model, x, solver="ddpm", steps=3, seeds=seeds, rng="torch")
    calls = []
    real = solvers.loop.make_streams

    def spy(seed_list, stream, rng="torch"):
        calls.append((list(seed_list), stream, rng))
        return real(seed_list, stream, rng)

    monkeypatch.setattr(solvers.loop, "make_streams", spy)
    philox_res = solvers.sample(model, x, solver="ddpm", steps=3, seeds=seeds, rng="philox")
    assert calls == [(seeds, N.STREAM_SOLVER, "philox")]
    assert philox_res.nfe == torch_res.nfe == 3
    assert not torch.equal(philox_res.samples, torch_res.samples)
    # both are samples of the same law: same order of magnitude, and not far apart relative to the data scale
    assert 0.5 < float(philox_res.samples.std() / torch_res.samples.std()) < 2
    # a deterministic solver draws nothing: the generator makes no difference
    calls.clear()
    d1 = solvers.sample(model, x, solver="ddim", steps=3, seeds=seeds, rng="philox").samples
    assert calls == []
    assert torch.equal(d1, solvers.sample(model, x, solver="ddim", steps=3, seeds=seeds, rng="torch").samples)


def test_sample_refuses_an_unknown_rng(gmm):
    card, model = gmm
    x = solvers.initial_noise((2, *card.sample_shape), schedule=model.schedule, dtype=torch.float64)
    with pytest.raises(ValueError, match="unknown rng 'numpy'; valid: torch, philox"):
        solvers.sample(model, x, solver="ddpm", steps=2, rng="numpy")
    with pytest.raises(ValueError, match="unknown rng"):  # refused even where no noise is drawn
        solvers.sample(model, x, solver="ddim", steps=2, rng="")

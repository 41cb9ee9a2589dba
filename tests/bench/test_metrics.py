"""The benchmark's quality measures against closed forms and against torch-fidelity's implementation."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

import pretrained
from bench import metrics as M


def _random_spd(rng, d, rank=None):
    a = rng.standard_normal((d, rank or d))
    return a @ a.T / (rank or d)


def test_frechet_distance_matches_the_closed_form_for_diagonal_gaussians():
    # W2² between N(m1, diag a) and N(m2, diag b) = |m1 − m2|² + Σ (√a − √b)²  (commuting covariances).
    rng = np.random.default_rng(0)
    m1, m2 = rng.standard_normal(6), rng.standard_normal(6)
    a, b = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    expected = np.sum((m1 - m2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert M.frechet_distance(m1, np.diag(a), m2, np.diag(b)) == pytest.approx(expected, rel=1e-12)


def test_frechet_distance_agrees_with_torch_fidelity():
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric
    rng = np.random.default_rng(1)
    for d in (3, 64):
        mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
        s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
        ours = M.frechet_distance(mu1, s1, mu2, s2)
        theirs = fid_statistics_to_metric({"mu": mu1, "sigma": s1}, {"mu": mu2, "sigma": s2}, False)[KEY_METRIC_FID]
        assert ours == pytest.approx(theirs, rel=1e-8)


def test_frechet_distance_of_singular_equal_covariances_is_the_mean_shift():
    # With S1 = S2 = S (rank-deficient), tr(S) + tr(S) − 2·tr(S) = 0: only |Δμ|² remains.  A square root of
    # the non-symmetric product would produce complex round-off here.
    rng = np.random.default_rng(2)
    s = _random_spd(rng, 32, rank=5)
    mu1, mu2 = rng.standard_normal(32), rng.standard_normal(32)
    assert M.frechet_distance(mu1, s, mu2, s) == pytest.approx(np.sum((mu1 - mu2) ** 2), rel=1e-9, abs=1e-9)
    assert M.frechet_distance(mu1, s, mu1, s) == pytest.approx(0.0, abs=1e-9)


def test_gaussian_statistics_is_the_unbiased_covariance_and_rejects_bad_input():
    x = np.random.default_rng(3).standard_normal((50, 4))
    mu, sigma = M.gaussian_statistics(x)
    np.testing.assert_allclose(mu, x.mean(0))
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False))
    with pytest.raises(ValueError, match="at least 2"):
        M.gaussian_statistics(x[:1])
    with pytest.raises(ValueError, match="NaN"):
        M.gaussian_statistics(np.full((3, 2), np.nan))


@pytest.mark.parametrize("splits", [[50], [1, 49], [7, 0, 20, 23], [2] * 25])
def test_feature_moments_batch_by_batch_equal_the_statistics_of_all_features_at_once(splits):
    # far from the origin, where a one-pass sum of squares would lose the covariance to cancellation
    x = 1e4 + np.random.default_rng(4).standard_normal((50, 6))
    mu, sigma = M.gaussian_statistics(x)
    moments, start = M.FeatureMoments(6), 0
    for size in splits:
        moments.add(x[start:start + size])
        start += size
    got_mu, got_sigma = moments.statistics()
    np.testing.assert_allclose(got_mu, mu, rtol=1e-12)
    np.testing.assert_allclose(got_sigma, sigma, rtol=1e-9, atol=1e-9)


def test_feature_moments_of_ranks_merge_in_any_order_and_refuse_bad_batches():
    x = np.random.default_rng(5).standard_normal((40, 3))
    a, b = M.FeatureMoments(3).add(x[:15]), M.FeatureMoments(3).add(x[15:])
    for merged in (M.FeatureMoments(3).merge(a).merge(b), M.FeatureMoments(3).merge(b).merge(a)):
        np.testing.assert_allclose(merged.statistics()[1], np.cov(x, rowvar=False), rtol=1e-12)
    with pytest.raises(ValueError, match=r"expected \(n, 3\)"):
        M.FeatureMoments(3).add(x[:, :2])
    with pytest.raises(ValueError, match="NaN"):
        M.FeatureMoments(3).add(np.full((2, 3), np.inf))
    with pytest.raises(ValueError, match="at least 2"):
        M.FeatureMoments(3).add(x[:1]).statistics()
    ref = dict(zip(("mu", "sigma"), M.gaussian_statistics(x + 1)))
    spec = M.METRICS["fd_resnet20"]
    assert spec.value(M.FeatureMoments(3).add(x), ref) == pytest.approx(spec.value(x, ref), rel=1e-12)


def test_sliced_wasserstein_of_a_shift():
    # Shifting every sample by v shifts each projection by θ·v, so SW2² = mean_θ (θ·v)², whose expectation over
    # uniform directions in R^d is |v|²/d.
    rng = np.random.default_rng(4)
    x = rng.standard_normal((500, 4))
    v = np.array([1.0, -2.0, 0.5, 0.0])
    sw = M.sliced_wasserstein(x, x + v, n_projections=4000, seed=0)
    assert sw == pytest.approx(np.linalg.norm(v) / 2.0, rel=0.05)
    assert M.sliced_wasserstein(x, x) == 0.0
    assert M.sliced_wasserstein(x, x + v) == M.sliced_wasserstein(x + v, x)


def test_sliced_wasserstein_with_unequal_sample_counts():
    # Every point repeated twice is the same empirical distribution: distance 0.
    x = np.random.default_rng(5).standard_normal((300, 2))
    assert M.sliced_wasserstein(x, np.concatenate([x, x])) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="dimensions"):
        M.sliced_wasserstein(x, np.zeros((3, 3)))


def test_metric_registry_rejects_unknown_and_unfitting_metrics():
    card = pretrained.get_card("gmm2d")
    with pytest.raises(ValueError, match="valid metrics: .*fd_data.*fd_resnet20"):
        M.check_metrics(["bogus"], card)
    with pytest.raises(ValueError, match="does not fit model 'gmm2d'.*metrics for gmm2d: fd_data, swd, ode_error"):
        M.check_metrics(["fid"], card)
    assert M.check_metrics(["swd", "swd", "fd_data"], card) == ["swd", "fd_data"]
    assert M.default_metrics(card) == ["fd_data", "swd", "ode_error"]


# -- the registry: each metric computes its own value ---------------------------------------------------------
def test_each_metric_computes_its_value_from_its_source():
    rng = np.random.default_rng(3)
    x, ref = rng.normal(size=(200, 2)), rng.normal(0.5, 1.0, size=(300, 2))
    fd, swd, ode = M.METRICS["fd_data"], M.METRICS["swd"], M.METRICS["ode_error"]
    assert fd.source == swd.source == "data" and ode.source == "ode_error"
    assert fd.compute(x, ref, deterministic=False) == (M.frechet_distance_features(x, ref), None)
    assert swd.compute(x, ref, deterministic=True) == (M.sliced_wasserstein(x, ref), None)
    squared = np.array([1.0, 4.0, 4.0, 7.0])
    assert ode.compute(squared, None, deterministic=True) == (pytest.approx(2.0, rel=1e-15), None)
    value, note = ode.compute(None, None, deterministic=False)   # deterministic_only is honoured
    assert math.isnan(value) and note == "not defined for a stochastic solver"
    stats = dict(zip(("mu", "sigma"), M.gaussian_statistics(ref)))
    for key in ("fid", "fd_resnet20"):
        spec = M.METRICS[key]
        assert spec.source == key and spec.weights_option.endswith("_weights")
        assert spec.compute(x, stats, True) == (pytest.approx(M.frechet_distance_features(x, ref), rel=1e-12), None)


def test_data_metrics_say_how_their_reference_and_floor_were_made():
    assert M.METRICS["swd"].reference_note(40, 1000, 10) == (
        "vs 1,000 exact data samples, 256 fixed directions; the noise floor is 40 fresh exact samples against "
        "them (mean ± sd of 10 draws)")
    assert M.METRICS["fd_data"].reference_note(40, 40, 10).startswith("vs 40 exact data samples; the noise floor")


# -- which metric fits which card, and the reason given when one does not -------------------------------------------
def test_an_unfitting_metric_gives_its_reason_in_full():
    gmm2d, cifar = pretrained.get_card("gmm2d"), pretrained.get_card("ddpm_cifar")
    assert M.get_metric("fid").unfit_reason(gmm2d) == "it is for image models and gmm2d is an analytic model"
    assert M.get_metric("ode_error").unfit_reason(cifar) == "it is for analytic models and ddpm_cifar is an image model"
    # a data-space distance on an image card: the kind is the reason, not the missing exact samples
    assert M.get_metric("fd_data").unfit_reason(cifar) == (
        "it is for analytic/points models and ddpm_cifar is an image model")
    no_data = dataclasses.replace(gmm2d, name="no_data", data_sampler=None)
    assert M.get_metric("swd").unfit_reason(no_data) == "it needs exact data samples, which no_data does not have"
    no_ode = dataclasses.replace(gmm2d, name="no_ode", exact_ode=None)
    assert M.get_metric("ode_error").unfit_reason(no_ode) == (
        "it needs an exact ODE solution, which no_ode does not have")


def test_an_image_card_whose_reference_is_none_gets_no_frechet_metric_and_defaults_to_ref_error():
    own = dataclasses.replace(pretrained.get_card("ddpm_cifar"), name="own", reference="none")
    for key in ("fid", "fd_resnet20"):
        assert M.get_metric(key).unfit_reason(own).startswith("it needs reference data, and own names none")
    assert M.metrics_for(own) == ["ref_error"] and M.default_metrics(own) == ["ref_error"]


def test_a_guided_card_gets_no_exact_ode_metric():
    guided = dataclasses.replace(pretrained.get_card("gmm2d"), name="guided", num_classes=3,
                                 condition=lambda model, labels, w: model)
    assert "guided" in M.get_metric("ode_error").unfit_reason(guided)
    assert M.default_metrics(guided) == ["fd_data", "swd"]


def test_a_latent_mnist_model_is_judged_on_its_decoded_images():
    """ldm_mnist samples latents that its decoder turns into 1×28×28 digits; the MNIST metrics see the decoded
    images (data_shape), not the latents' shape."""
    ldm = pretrained.get_card("ldm_mnist")
    assert tuple(ldm.sample_shape) != (1, 28, 28) and ldm.data_shape == (1, 28, 28)
    assert M.get_metric("fd_mnist").unfit_reason(ldm) is None
    assert M.default_metrics(ldm) == ["fd_mnist"]


def test_class_accuracy_needs_the_classifiers_ten_classes():
    five = dataclasses.replace(pretrained.get_card("fm_mnist"), name="five", num_classes=5,
                               condition=lambda model, labels, w: model)
    assert M.get_metric("class_accuracy").unfit_reason(five) == (
        "it is for MNIST-like models (1×28×28 images, 10 classes: the MNIST classifier's) and five makes 1×28×28 "
        "images of 5 classes")


def test_a_refused_metric_lists_the_metrics_that_fit_and_no_others():
    with pytest.raises(ValueError) as e:
        M.check_metrics(["swd", "fid"], pretrained.get_card("gmm2d"))
    assert str(e.value) == ("metric 'fid' does not fit model 'gmm2d': it is for image models and gmm2d is an analytic "
                            "model; metrics for gmm2d: fd_data, swd, ode_error, ref_error")

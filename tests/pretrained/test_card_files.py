"""Card files (pretrained.card_files): a latent model's [decoder] table — checked when read, and the card it
makes (decoded kind and shape, the image range, the decoder's latent scale). Tiny factory decoders, no weights."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pretrained.card_files import card_from_toml

NETWORK = '[network]\nfactory = "torch.nn:Identity"\n'   # read, not built: the card's loader is not called here
SCHEDULE = '[schedule]\nname = "discrete_vp"\n'


def _card(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "card.toml"
    path.write_text(body)
    return path


# -- a latent model's [decoder] table -----------------------------------------------------------------------------
LATENT_TOP = 'sample_shape = [4]\nprediction = "eps"\n' + NETWORK + SCHEDULE


@pytest.mark.parametrize("decoder", ["data_shape = [1, 2, 2]\n",
                                     "factory = 'torch.nn:Identity'\ndiffusers = 'vae'\ndata_shape = [1, 2, 2]\n"],
                         ids=["neither", "both"])
def test_a_decoder_table_needs_exactly_one_kind_of_decoder(tmp_path, decoder):
    with pytest.raises(ValueError, match=r"\[decoder\] needs exactly one of factory, diffusers and the decoded"):
        card_from_toml(_card(tmp_path, LATENT_TOP + "[decoder]\n" + decoder))


@pytest.mark.parametrize("scale, factor", [("", 1.0), ("scale = 2\n", 0.5), ("scale = 0.5\n", 2.0)])
def test_a_factory_decoder_divides_the_latents_by_the_scale(tmp_path, scale, factor):
    """samples = decoder(latents / scale), the scale 1 when the card gives none (any finite scale is allowed:
    an autoencoder's latent scale is whatever its training made it)."""
    card = card_from_toml(_card(tmp_path, LATENT_TOP + "[decoder]\nfactory = 'torch.nn:Identity'\n" + scale
                                + "data_shape = [1, 2, 2]\n"))
    latents = torch.arange(8.0).reshape(2, 4)
    torch.testing.assert_close(card.decoder(device="cpu")(latents), latents * factor, rtol=0, atol=0)


def test_decoded_images_of_a_vector_latent_get_the_image_range_and_other_shapes_are_points(tmp_path):
    card = card_from_toml(_card(tmp_path, 'data_range = [-2.0, 2.0]\n' + LATENT_TOP
                                + "[decoder]\nfactory = 'torch.nn:Identity'\ndata_shape = [1, 2, 2]\n"))
    assert card.kind == "image" and card.data_shape == (1, 2, 2) and card.decoder_name == "torch.nn:Identity"
    ends = card.to_images(torch.tensor([-2.0, 2.0]).reshape(1, 1, 1, 2))   # the card's data range → [0, 1]
    torch.testing.assert_close(ends.flatten(), torch.tensor([0.0, 1.0]))
    for shape in ("[3]", "[2, 3]"):   # not C×H×W: decoded points, no images
        card = card_from_toml(_card(tmp_path, LATENT_TOP + "[decoder]\nfactory = 'torch.nn:Identity'\n"
                                    f"data_shape = {shape}\n"))
        assert card.kind == "points" and card.to_images is None, shape


def test_network_kwargs_that_do_not_fit_the_factory_name_the_card_key(tmp_path):
    """A misspelt [network] kwargs key is refused naming the card table, the keys and what the factory takes —
    not as a TypeError from inside the loader."""
    body = ('sample_shape = [4]\nprediction = "eps"\n[network]\nfactory = "torch.nn:Linear"\n'
            "kwargs = { in_feature = 4, out_features = 4 }\n" + SCHEDULE)
    card = card_from_toml(_card(tmp_path, body))
    with pytest.raises(ValueError, match=r"card\.toml: \[network\] kwargs \['in_feature', 'out_features'\] do not "
                                         r"fit torch\.nn:Linear .*it takes: in_features, out_features, bias"):
        card.loader(device="cpu")

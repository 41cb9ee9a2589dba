"""Your own network in the harness by import path:

    python -m bench.run --model examples.my_model:model --steps 5,10,20 --solvers ddim,dpmpp_3m,unipc

``model`` is a :class:`solvers.DiffusionModel` with a ``sample_shape`` (or pass ``--shape 2``); a callable
returning one works too (``examples.my_model:make_model``, called with ``device=`` when it takes it).  With no
reference data, each cell is scored against a high-accuracy solution of the model's own ODE (``ref_error``).
Here the network is the exact ε of a 2-D mixture of two Gaussians, so the numbers are easy to check.
"""
import solvers
from pretrained.analytic import GaussianMixture
from solvers import schedules


def make_model(device: str = "cpu") -> solvers.DiffusionModel:
    """A 2-D mixture of two Gaussians on the VP-linear schedule, as an ε-predicting DiffusionModel."""
    mixture = GaussianMixture([[-2.0, 0.0], [2.0, 0.5]], [0.3, 0.3])
    model = mixture.as_model(schedules.VPLinear(), prediction="eps")
    model.sample_shape = (2,)
    return model


make_model.sample_shape = (2,)
model = make_model()

"""GSNR checks next to your unit tests, with the ``gsnr`` fixture of gsnr-diag's pytest plugin.

Copy this file into your test suite and replace ``make_data``/``build_model`` with your own.
It needs nothing but gsnr-diag installed (the plugin registers itself with pytest) and runs in
a few seconds on a CPU:

    pytest examples/test_example_gsnr.py
    pytest examples/test_example_gsnr.py --gsnr-report gsnr.html --gsnr-save gsnr-runs/

The task: a noisy XOR of four Gaussian clusters in 8 dimensions (2 informative), learned by a
small ReLU MLP. Only a network that learns features can solve XOR, so it is a small stand-in for
"this architecture learns features on real labels, not on shuffled ones" (Liu et al., ICLR 2020,
Sec. 3.1 and Fig. 5).
"""

import pytest
import torch
from torch import nn


def make_data(n=256, dim=8, seed=0):
    """(X, y): XOR of four Gaussian clusters; the label is which diagonal the cluster lies on."""
    g = torch.Generator().manual_seed(seed)
    cluster = torch.randint(0, 4, (n,), generator=g)
    centers = 1.5 * torch.tensor([[1.0, 1.0], [-1.0, -1.0], [1.0, -1.0], [-1.0, 1.0]])
    x = 0.5 * torch.randn(n, dim, generator=g)
    x[:, :2] += centers[cluster]
    y = (cluster >= 2).long()
    return x, y


def build_model():
    """A fresh 8-32-2 ReLU MLP with a small initialization (the fixture seeds torch before calling it)."""
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.1)
    return model


@pytest.fixture(scope="module")
def data():
    return make_data()


# Default thresholds for every test in this module; explicit arguments override them, and they
# override the project-wide ini options (e.g. gsnr_min_same_sign = 0.5 in pytest.ini).
pytestmark = pytest.mark.gsnr(min_same_sign=0.5, min_ratio=3.0)


def test_gradients_agree_at_initialization(gsnr, data):
    """One measurement at the current weights: GradientStats (eq. 2, eq. 19, Sec. 3.1)."""
    torch.manual_seed(0)
    stats = gsnr.stats(build_model(), data)  # cross-entropy by default; any loss_fn(output, target) works
    # min_same_sign comes from the module's marker; no layer may have collapsed to GSNR ~ 0.
    gsnr.expect(stats, min_mean_gsnr=0.01, min_layer_gsnr={"*.weight": 0.01})


def test_mean_gsnr_rises_while_learning_features(gsnr, data):
    """Train with full-batch gradient descent and record GSNR every 10 steps: a Trajectory."""
    trajectory = gsnr.track(build_model, data, epochs=40, lr=0.5, every=10)
    assert trajectory.snapshots[-1].train_accuracy > 0.95
    gsnr.expect_rising(trajectory, factor=1.2)  # peak mean GSNR >= 1.2 x its value at step 0


def test_real_labels_beat_shuffled_labels(gsnr, data):
    """The shuffled-label control: same initialization, real vs randomly permuted labels."""
    control = gsnr.control(build_model, data, epochs=40, lr=0.5, every=10)
    gsnr.expect_control(control)  # min_ratio=3.0 from the marker: real/shuffled mean-GSNR ratio at the end

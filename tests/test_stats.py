"""GradientStats: derived fields."""

import torch


def test_derived_fields_are_computed_on_first_read_from_the_weights_at_measurement():
    """GradientStats derives GSNR, quantiles and sign statistics lazily, from a copy of the weights taken then."""
    import pickle

    from gsnr_diag import gradient_stats

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3))
    X, Y = torch.randn(40, 5), torch.randint(0, 3, (40,))
    eager = gradient_stats(model, (X, Y))
    eager.aggregates()
    lazy = gradient_stats(model, (X, Y))
    assert "_inputs" in lazy.__dict__  # nothing derived yet
    with torch.no_grad():
        model[0].weight.neg_()  # training on after the measurement must not change it
    assert lazy.aggregates() == eager.aggregates()
    assert "_inputs" not in lazy.__dict__
    again = pickle.loads(pickle.dumps(gradient_stats(model, (X, Y))))
    assert again.opposite_sign is not None and again.gsnr.keys() == eager.gsnr.keys()

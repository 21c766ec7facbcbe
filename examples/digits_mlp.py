"""A gsnr-diag model file: a small MLP on scikit-learn's handwritten digits (1,797 8×8 images).

Run it with::

    gsnr-diag report examples/digits_mlp.py --pdf digits.pdf

``sklearn.datasets.load_digits`` ships with scikit-learn, so nothing is downloaded. The
data are shuffled with a fixed seed and split 1,400 train / 397 test. A two-hidden-layer
ReLU MLP trained with plain SGD: it fits the training set completely within a few
epochs, which makes the shuffled-label control easy to read.
"""

import numpy as np
import torch
from torch import nn

EPOCHS = 20
LR = 0.05
BATCH_SIZE = 32
TASK = "classification"
N_TRAIN = 1400


def build_model() -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, 128),
        nn.ReLU(),
        nn.Linear(128, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


def load_data():
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.target))
    X = torch.tensor(digits.data[order] / 16.0, dtype=torch.float32)
    X = (X - X[:N_TRAIN].mean(0)) / (X[:N_TRAIN].std(0) + 1e-6)
    y = torch.tensor(digits.target[order], dtype=torch.long)
    return (X[:N_TRAIN], y[:N_TRAIN]), (X[N_TRAIN:], y[N_TRAIN:])

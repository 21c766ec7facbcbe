"""A gsnr-diag model file: a small CNN on scikit-learn's handwritten digits (8×8 images), SGD with momentum.

Run it with::

    gsnr-diag report examples/digits_cnn.py --epochs 3
    gsnr-diag report examples/digits_cnn.py --epochs 30

``sklearn.datasets.load_digits`` ships with scikit-learn, so nothing is downloaded. The data are
shuffled with a fixed seed and split 1,400 train / 397 test, as in ``digits_mlp.py``. Two 3×3
convolution + ReLU + 2×2 max-pool stages and a linear classifier, trained with SGD and momentum
0.9: after about 3 epochs it is still learning (test accuracy in the 80s %), after 30 it has
fitted the training set — both generalize, and the report should say so for either length.
"""

import numpy as np
import torch
from torch import nn

EPOCHS = 8
LR = 0.01
BATCH_SIZE = 32
TASK = "classification"
N_TRAIN = 1400


def build_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, kernel_size=3, padding=1),  # 8×8
        nn.ReLU(),
        nn.MaxPool2d(2),  # → 4×4
        nn.Conv2d(8, 16, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),  # → 2×2
        nn.Flatten(),
        nn.Linear(16 * 2 * 2, 10),
    )


def load_data():
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.target))
    X = torch.tensor(digits.data[order] / 16.0, dtype=torch.float32)
    X = (X - X[:N_TRAIN].mean()) / X[:N_TRAIN].std()
    X = X.reshape(-1, 1, 8, 8)
    y = torch.tensor(digits.target[order], dtype=torch.long)
    return (X[:N_TRAIN], y[:N_TRAIN]), (X[N_TRAIN:], y[N_TRAIN:])


def make_optimizer(params):
    return torch.optim.SGD(params, lr=LR, momentum=0.9)

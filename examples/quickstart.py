"""Quickstart: the per-layer GSNR table of a small MLP on scikit-learn's digits.

    python examples/quickstart.py

Measures at initialization, trains for a few epochs of plain mini-batch SGD, and measures
again. Elements with zero variance (e.g. weights of the digit images' always-blank border
pixels) are undefined and excluded, as SCIENCE.md prescribes; the table counts them.
"""

import torch
from sklearn.datasets import load_digits
from torch import nn

from gsnr_diag import gradient_stats


def main() -> None:
    torch.manual_seed(0)
    digits = load_digits()
    X = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    Y = torch.tensor(digits.target)
    train = (X[:1500], Y[:1500])
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))

    print("At initialization:\n")
    print(gradient_stats(model, train, nn.CrossEntropyLoss(), batch_size=500).summary())

    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(5):
        perm = torch.randperm(1500)
        for i in range(0, 1500, 32):
            idx = perm[i : i + 32]
            opt.zero_grad()
            nn.functional.cross_entropy(model(train[0][idx]), train[1][idx]).backward()
            opt.step()
    print("\nAfter 5 epochs of SGD:\n")
    print(gradient_stats(model, train, nn.CrossEntropyLoss(), batch_size=500).summary())


if __name__ == "__main__":
    main()

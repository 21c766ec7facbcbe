"""Loading a user's model file: required and optional names, errors, the user's traceback."""

from __future__ import annotations

import textwrap

import pytest
import torch

from gsnr_diag.cli.modelfile import ModelFileError, UserCodeError, load_model_file, split_data

GOOD = """
import torch
from torch import nn

EPOCHS = 3
LR = 0.1
BATCH_SIZE = None
TASK = "classification"

def build_model():
    return nn.Linear(4, 3)

def load_data():
    X, Y = torch.randn(30, 4), torch.randint(0, 3, (30,))
    return (X[:20], Y[:20]), (X[20:], Y[20:])

loss_fn = nn.CrossEntropyLoss()
"""


def write(tmp_path, text, name="model.py"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_good_file(tmp_path):
    mf = load_model_file(write(tmp_path, GOOD))
    assert (mf.epochs, mf.lr, mf.batch_size, mf.batch_size_given, mf.task) == (3, 0.1, None, True, "classification")
    assert isinstance(mf.build(), torch.nn.Module)
    train, test = mf.data()
    assert train[0].shape == (20, 4) and test[1].shape == (10,)
    assert mf.loss_fn is not None and mf.make_optimizer is None


@pytest.mark.parametrize("missing", ["build_model", "load_data"])
def test_missing_required_name_says_what_and_shows_example(tmp_path, missing):
    text = GOOD.replace(f"def {missing}(", f"def not_{missing}(")
    with pytest.raises(ModelFileError) as info:
        load_model_file(write(tmp_path, text))
    msg = str(info.value)
    assert f"missing required name {missing}" in msg
    assert "A minimal model file looks like this" in msg and "def build_model():" in msg


@pytest.mark.parametrize(
    "line, fragment",
    [
        ("build_model = 3", "build_model is a int"),
        ("EPOCHS = 'ten'", "EPOCHS = 'ten'"),
        ("EPOCHS = 0", "EPOCHS = 0"),
        ("LR = -1", "LR = -1"),
        ("BATCH_SIZE = 2.5", "BATCH_SIZE = 2.5"),
        ("TASK = 'ranking'", "TASK = 'ranking'"),
        ("loss_fn = 'mse'", "loss_fn is a str"),
    ],
)
def test_wrong_kinds(tmp_path, line, fragment):
    with pytest.raises(ModelFileError, match=fragment.replace("(", r"\(").replace(".", r"\.")):
        load_model_file(write(tmp_path, GOOD + "\n" + line + "\n"))


def test_not_a_module_from_build_model(tmp_path):
    mf = load_model_file(write(tmp_path, GOOD + "\ndef build_model():\n    return 'a model'\n"))
    with pytest.raises(ModelFileError, match="build_model\\(\\) returned a str"):
        mf.build()


def test_missing_file_and_wrong_suffix(tmp_path):
    with pytest.raises(ModelFileError, match="no such file"):
        load_model_file(tmp_path / "nope.py")
    with pytest.raises(ModelFileError, match="ending in .py"):
        load_model_file(write(tmp_path, GOOD, name="model.txt"))


def test_exception_at_import_carries_the_users_traceback(tmp_path):
    path = write(tmp_path, "import torch\n\ndef helper():\n    raise ValueError('bad config value')\n\nhelper()\n")
    with pytest.raises(UserCodeError) as info:
        load_model_file(path)
    tb = info.value.user_traceback
    assert "ValueError: bad config value" in tb
    assert str(path) in tb and "line 4, in helper" in tb
    assert "modelfile.py" not in tb and "importlib" not in tb


def test_exception_in_load_data_carries_the_users_traceback(tmp_path):
    path = write(tmp_path, GOOD + "\ndef load_data():\n    return {}['missing key']\n")
    mf = load_model_file(path)
    with pytest.raises(UserCodeError) as info:
        mf.data()
    assert info.value.where.startswith("load_data()")
    assert "KeyError: 'missing key'" in info.value.user_traceback
    assert "modelfile.py" not in info.value.user_traceback


def test_split_data_forms():
    X, Y = torch.randn(10, 2), torch.arange(10)
    train, test = split_data((X, Y))
    assert train[0] is X and test is None
    train, test = split_data(((X, Y), (X, Y)))
    assert train[1] is Y and test[1] is Y
    train, test = split_data({"train": (X, Y), "test": None})
    assert test is None
    ds = torch.utils.data.TensorDataset(X, Y)
    train, test = split_data((ds, ds))
    assert train is ds and test is ds

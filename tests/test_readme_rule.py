"""The README's worked example of registering a moment rule runs as written and is exact."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from reference import reference_stats
from torch import nn

README = Path(__file__).resolve().parents[1] / "README.md"


def _example_code() -> str:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("### Adding a moment rule") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_moment_rule_example_is_exact(capsys):
    from gsnr_diag.capture.registry import MOMENT_RULES

    namespace: dict = {}
    try:
        exec(compile(_example_code(), str(README), "exec"), namespace)
        assert "'1': 'moment-rule'" in capsys.readouterr().out
        model, X, Y = namespace["model"], namespace["X"], namespace["Y"]
        stats = namespace["stats"]
        ref = reference_stats(model, X.double(), Y, nn.CrossEntropyLoss())
        for k in ref["mean"]:
            scale = float(np.abs(ref["mean"][k]).max())
            np.testing.assert_allclose(stats.mean[k].numpy(), ref["mean"][k], rtol=1e-4, atol=1e-6 * scale)
            np.testing.assert_allclose(
                stats.var[k].numpy(), ref["var"][k], rtol=1e-4, atol=1e-6 * float(ref["var"][k].max())
            )
    finally:
        MOMENT_RULES.pop(namespace.get("Scale"), None)  # keep the registry as the other tests expect it

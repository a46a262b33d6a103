"""`ctv2v model fit`: the batch search picks the largest batch under the budget; bad arguments are one line.

The presets' 60-90 % band is not asserted here yet: a `model fit` run on 2026-12-02 found that `pretrained` full fine-tuning on a
16 GB card fits batch 1 at an estimated 53 % and batch 2 exceeds 85 % (issue 15 stays open on that point).
"""

from __future__ import annotations

import pytest

from ctv2v.train.estimate import (
    CARDS,
    _largest_fitting,
    with_allowance,
)
from pipeline.cli import main as cli
from tests.conftest import REPO


def test_batch_search_takes_the_largest_batch_under_the_budget():
    gib = 2**30
    calls = []

    def affine(sizes):  # 3 GiB fixed + 0.7 GiB per clip (tracked, before the allowance)
        calls.append(list(sizes))
        return [int(3 * gib + 0.7 * gib * size) for size in sizes]

    budget = int(0.85 * CARDS["v100-32gb"])
    batch, peak = _largest_fitting(affine, budget)
    assert with_allowance(affine([batch])[0]) <= budget < with_allowance(affine([batch + 1])[0])
    assert peak <= budget and calls[0] == [1, 2]

    def superlinear(sizes):  # grows faster than the line through batches 1 and 2 predicts
        return [int(1 * gib + 0.1 * gib * size + 0.02 * gib * size**2) for size in sizes]

    batch, peak = _largest_fitting(superlinear, budget)
    assert with_allowance(superlinear([batch])[0]) <= budget < with_allowance(superlinear([batch + 1])[0])

    assert _largest_fitting(lambda sizes: [40 * gib for _ in sizes], budget) is None


def test_fit_refuses_bad_arguments_in_one_line(capsys):
    assert cli(["model", "fit", "--config", str(REPO / "configs" / "main.yaml"), "--card", "v100-32gb",
                "--share", "1.5"]) == 1
    assert "--share 1.5: a share of the card between 0 and 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli(["model", "fit", "--config", str(REPO / "configs" / "main.yaml"), "--card", "a100-80gb"])
    assert "invalid choice: 'a100-80gb'" in capsys.readouterr().err

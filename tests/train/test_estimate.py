"""`ctv2v model fit`: the batch search picks the largest batch under the budget; bad arguments are one line; the
shipped V100 presets are what `model fit` wrote, and each variant and phase fills its card to 60-90 % (estimated).
"""

from __future__ import annotations

import pytest

import re

import yaml

from ctv2v.config import VARIANTS
from ctv2v.config_io import load_config
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


PRESET_ROW = re.compile(r"^#\s+(\w+)\s+(frozen|full)\s+batch\s+(\d+):\s+([\d.]+) GiB \((\d+)% of the card\)$")


@pytest.mark.parametrize("card", sorted(CARDS))
def test_each_v100_preset_is_the_fit_and_fills_its_card_within_the_band(card, capsys):
    """The estimate itself takes minutes per batch size, so it is not rerun here: the preset must be the file
    `model fit --write` produced (its header names the command and every estimate), with batches that match the
    header and every estimated peak between 60 % and 90 % of the card; the table is printed."""
    path = REPO / "configs" / f"{card}.yaml"
    text = path.read_text()
    assert f"ctv2v model fit --config configs/main.yaml --card {card}" in text
    assert f"--write configs/{card}.yaml" in text
    rows = [PRESET_ROW.match(line) for line in text.splitlines()]
    estimates = {(m[1], m[2]): (int(m[3]), float(m[4]), int(m[5])) for m in rows if m}
    assert set(estimates) == {(variant, phase) for variant in VARIANTS for phase in ("frozen", "full")}
    overlay = yaml.safe_load(text)
    for (variant, phase), (batch, gib, percent) in estimates.items():
        assert overlay["training"][phase]["batch_size_by_variant"][variant] == batch
        assert abs(gib * 2**30 / CARDS[card] - percent / 100) < 0.01
        assert 60 <= percent <= 90, f"{card} {variant} {phase}: {percent} % of the card"
    for base in ("main.yaml", "pretrained.yaml"):
        load_config([REPO / "configs" / base, path])  # a valid overlay for either branch's config
    with capsys.disabled():
        print(f"\n{card}: " + "; ".join(f"{v} {p} batch {b} {pc} %" for (v, p), (b, _, pc) in estimates.items()))

"""binary_search.allocate: the Lagrangian allocation of one budget over additive per-layer loss curves."""
import itertools
import math

import pytest

import binary_search

RATIOS = ["0.2", "0.4", "0.6", "0.8"]


def convex_table(weights):
    # loss of a layer at ratio r: w * (1 - r)^2, convex and decreasing; dense (1.0) costs 0 loss
    return {f"l{i}": {r: w * (1 - float(r)) ** 2 for r in RATIOS} for i, w in enumerate(weights)}


def cost(name, r):
    return 100.0 * r  # every layer has 100 parameters dense


def brute_force(table, budget):
    names = list(table)
    best = (math.inf, None)
    for choice in itertools.product(RATIOS + ["1.0"], repeat=len(names)):
        c = sum(cost(n, float(r)) for n, r in zip(names, choice))
        if c <= budget + 1e-9:
            loss = sum(0.0 if r == "1.0" else table[n][r] for n, r in zip(names, choice))
            best = min(best, (loss, choice), key=lambda t: t[0])
    return best


@pytest.mark.parametrize("budget", [80, 120, 160, 200, 240])
def test_allocation_matches_brute_force_on_convex_curves(budget):
    table = convex_table([1.0, 4.0, 0.5])
    ratios = binary_search.allocate(table, cost, budget)
    spent = sum(cost(n, r) for n, r in ratios.items())
    assert spent <= budget + 1e-9
    loss = sum(0.0 if r >= 1 else table[n][f"{r:.1f}"] for n, r in ratios.items())
    assert loss == pytest.approx(brute_force(table, budget)[0])


def test_allocation_gives_the_sensitive_layer_more_and_more_budget_never_hurts():
    table = convex_table([1.0, 50.0])
    r = binary_search.allocate(table, cost, 120)
    assert r["l1"] > r["l0"]
    losses = []
    for budget in (60, 100, 140, 180):
        rr = binary_search.allocate(table, cost, budget)
        losses.append(sum(0.0 if v >= 1 else table[n][f"{v:.1f}"] for n, v in rr.items()))
    assert losses == sorted(losses, reverse=True)


def test_allocation_never_picks_a_non_finite_loss_and_rejects_an_unreachable_budget():
    table = {"a": {"0.2": math.nan, "0.4": 1.0, "0.6": 0.5}, "b": {"0.2": 2.0, "0.4": 1.0, "0.6": math.inf}}
    r = binary_search.allocate(table, cost, 80)
    assert r == {"a": 0.4, "b": 0.4}
    with pytest.raises(ValueError, match="below what the candidate ratios can reach"):
        binary_search.allocate(table, cost, 50)

"""Mixed-precision allocation: candidate sizes, the convex hull, the knapsack against brute force, budgets."""

import itertools
import random

import pytest

from lowbit.config import QuantConfig, QuantRecipe
from lowbit.errors import ConfigError
from lowbit.plan.allocate import Allocation, allocate, allowed_for_format, layer_budget, lower_hull, parse_size
from lowbit.plan.candidates import Candidate, default_candidates, parse_candidate, parse_candidates
from lowbit.plan.sensitivity import SensitivityTable


def test_candidate_names_and_bytes() -> None:
    c = parse_candidate("4g128")
    assert c.config == QuantConfig(bits=4, group_size=128)
    # 1536 × 576 at 4-bit g128 asym: codes 288 B/row, 5 groups (last one ragged) × (fp16 scale + uint8 zero) per row
    assert c.weight_bytes(1536, 576) == 1536 * (288 + 5 * 3)
    assert parse_candidate("3g64sym").weight_bytes(10, 64) == 10 * (24 + 2)
    assert parse_candidate("8pc").config == QuantConfig(bits=8, granularity="channel")
    assert parse_candidate("fp16").weight_bytes(3, 5) == 30 and parse_candidate("fp16").is_float
    assert [c.name for c in parse_candidates("4g128, 3g64,4g128")] == ["4g128", "3g64"]
    assert len(default_candidates()) == 12 and not any(c.config and c.config.bits == 2 for c in default_candidates())
    for bad in ("9g128", "4g", "4x", ""):
        with pytest.raises(ConfigError, match="3g128|--candidates"):
            parse_candidates(bad)


def test_lower_hull_drops_dominated_and_concave_points() -> None:
    points = [(10, 5.0, 0), (20, 2.0, 1), (30, 1.5, 2), (25, 3.0, 3), (40, 0.1, 4), (40, 0.2, 5), (50, 0.1, 6)]
    # (25, 3.0) is dominated by (20, 2.0); (30, 1.5) lies above the segment (20, 2.0)–(40, 0.1); (50, 0.1) gains nothing
    assert [p[2] for p in lower_hull(points)] == [0, 1, 4]


def _table(costs: list[list[tuple[int, float]]]) -> SensitivityTable:
    cands = [Candidate(f"c{j}", None) for j in range(len(costs[0]))]
    return SensitivityTable([f"l{i}" for i in range(len(costs))], [(1, 1)] * len(costs), cands,
                            [[c[1] for c in row] for row in costs], [[0.0] * len(row) for row in costs],
                            [[c[0] for c in row] for row in costs])


@pytest.mark.parametrize("seed", range(20))
def test_allocation_is_near_the_brute_force_optimum(seed: int) -> None:
    rng = random.Random(seed)
    costs = []
    for _ in range(5):
        row, size, loss = [], rng.randint(5, 20), rng.uniform(1, 10)
        for _ in range(4):
            row.append((size, loss))
            size += rng.randint(1, 20)
            loss *= rng.uniform(0.05, 1.1)  # sometimes no better: dominated candidates exist
        costs.append(row)
    table = _table(costs)
    low, high = sum(r[0][0] for r in costs), sum(r[-1][0] for r in costs)
    budget = rng.randint(low, high)
    result = allocate(table, budget)
    best = min(sum(costs[i][j][1] for i, j in enumerate(pick)) for pick in itertools.product(range(4), repeat=5)
               if sum(costs[i][j][0] for i, j in enumerate(pick)) <= budget)
    assert result.weight_bytes <= budget
    pick = [int(result.choice[f"l{i}"].name[1:]) for i in range(5)]  # the reported totals are the choice's
    assert result.weight_bytes == sum(costs[i][j][0] for i, j in enumerate(pick))
    assert result.predicted_kl == pytest.approx(sum(costs[i][j][1] for i, j in enumerate(pick)), abs=1e-9)
    assert result.predicted_kl >= best - 1e-9
    # the LP bound: greedy on the hulls is optimal up to one layer's partly bought step
    assert result.predicted_kl <= best + max(r[0][1] - min(c[1] for c in r) for r in costs) + 1e-9


def test_allocation_buys_where_loss_per_byte_is_highest() -> None:
    # layer 0 gains 9 from 10 extra bytes, layer 1 gains 1: a budget for one upgrade goes to layer 0
    table = _table([[(10, 10.0), (20, 1.0)], [(10, 10.0), (20, 9.0)]])
    result = allocate(table, 30)
    assert [c.name for c in result.choice.values()] == ["c1", "c0"] and result.weight_bytes == 30
    with pytest.raises(ConfigError, match="smallest candidates need 20"):
        allocate(table, 19)


def test_allocation_recipe_gives_every_layer_its_config() -> None:
    q3, q8 = parse_candidate("3g128"), parse_candidate("8pc")
    alloc = Allocation({"a.x": q3, "a.y": q8, "a.z": parse_candidate("fp16")}, 0, 1, 0.0)
    recipe = alloc.recipe(QuantRecipe(QuantConfig(bits=4), exclude=("lm_head",)))
    assert recipe.config_for("a.x") == q3.config and recipe.config_for("a.y") == q8.config
    assert not recipe.selects("a.z", True) and recipe.selects("a.x", True) and not recipe.selects("lm_head", False)
    embeddings = QuantConfig(bits=8, symmetric=True, group_size=64)  # a quantized embedding survives the mix
    assert alloc.recipe(QuantRecipe(QuantConfig(bits=4), embeddings=embeddings)).embeddings == embeddings


def test_budgets_and_formats() -> None:
    table = _table([[(10, 1.0)], [(10, 1.0)]])
    table.shapes = [(4, 8), (4, 8)]
    assert layer_budget(table, target_bpw=4.0) == 32
    assert layer_budget(table, max_bytes=1000, fixed_bytes=900) == 100
    with pytest.raises(ConfigError, match="not more than what stays in float"):
        layer_budget(table, max_bytes=900, fixed_bytes=900)
    with pytest.raises(ConfigError, match="exactly one budget"):
        layer_budget(table)
    table.candidates = [parse_candidate("4g128"), parse_candidate("4g8")]
    table.shapes = [(4, 576), (4, 512)]
    assert allowed_for_format(table, "compressed-tensors") == [[False, True], [True, True]]
    assert allowed_for_format(table, "lowbit") is None
    with pytest.raises(ConfigError, match="GGUF block types as --candidates"):
        allowed_for_format(table, "gguf")


def test_parse_size() -> None:
    assert parse_size("60MB") == 60_000_000 and parse_size("1.5GB") == 1_500_000_000
    assert parse_size("700MiB") == 700 * 2**20 and parse_size("1234") == 1234
    for bad in ("lots", "-5MB", "5XB"):
        with pytest.raises(ConfigError, match="60MB"):
            parse_size(bad)

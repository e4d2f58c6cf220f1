"""Part 5: from offline to online. The sample size and duration of an A/B test of the switch
(two-proportion z-test on a click-through or conversion rate, Cohen's h effect size;
``statsmodels.stats.power.NormalIndPower`` and ``statsmodels.stats.proportion.proportion_effectsize``),
every assumption returned beside the number.

No offline-to-online conversion is known: how much of an offline nDCG gain shows up as clicks
is the question the test answers. The offline effect is therefore used only in explicitly
hypothetical scenarios ("if the online relative lift were f times the offline relative gain"),
and the factor f that would make the offline gain reach the minimum detectable effect is given.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import pandas as pd
from statsmodels.stats.power import NormalIndPower
from statsmodels.stats.proportion import proportion_effectsize

#: hypothetical offline-to-online factors shown as scenarios (never as a measured conversion)
SCENARIO_FACTORS = (1.0, 0.5, 0.1)


@dataclass(frozen=True)
class ABPlan:
    """The A/B test's parameters. Defaults are placeholders to replace with the shop's numbers."""

    baseline_rate: float = 0.05  # click-through (or conversion) rate of the current "similar items"
    daily_traffic: int = 10_000  # users (units of randomisation) who see the module per day
    mde_relative: float = 0.05  # smallest relative lift worth detecting (+5% of the baseline rate)
    alpha: float = 0.05  # two-sided false-positive rate
    power: float = 0.8  # chance of detecting a true lift of mde_relative
    traffic_share: float = 1.0  # share of the daily traffic in the experiment (both arms)
    alternative: str = "two-sided"

    def __post_init__(self) -> None:
        if not 0 < self.baseline_rate < 1:
            raise ValueError(f"baseline_rate must be in (0, 1), got {self.baseline_rate}")
        if self.daily_traffic < 1:
            raise ValueError(f"daily_traffic must be >= 1, got {self.daily_traffic}")
        if not 0 < self.baseline_rate * (1 + self.mde_relative) < 1 or self.mde_relative == 0:
            raise ValueError(f"mde_relative must be non-zero and keep the rate in (0, 1), got {self.mde_relative}")
        if not 0 < self.alpha < 1 or not 0 < self.power < 1 or not 0 < self.traffic_share <= 1:
            raise ValueError("alpha and power must be in (0, 1), traffic_share in (0, 1]")


def sample_size(plan: ABPlan, relative_lift: float | None = None) -> tuple[float, float]:
    """(Cohen's h, users per arm) to detect ``relative_lift`` (default: the plan's MDE), equal arms."""
    lift = plan.mde_relative if relative_lift is None else relative_lift
    h = proportion_effectsize(plan.baseline_rate * (1 + lift), plan.baseline_rate)
    n = NormalIndPower().solve_power(effect_size=abs(h), alpha=plan.alpha, power=plan.power, ratio=1.0, alternative=plan.alternative)
    return float(h), float(n)


def days_needed(plan: ABPlan, n_per_arm: float) -> int:
    return math.ceil(2 * math.ceil(n_per_arm) / (plan.daily_traffic * plan.traffic_share))


def ab_plan_table(plan: ABPlan) -> pd.DataFrame:
    """The sample size and days, with every assumption on its own row."""
    h, n = sample_size(plan)
    rows = [{"quantity": name, "value": value, "note": "assumption (parameter)"} for name, value in asdict(plan).items()]
    rows += [
        {"quantity": "target rate", "value": plan.baseline_rate * (1 + plan.mde_relative), "note": "baseline_rate * (1 + mde_relative)"},
        {"quantity": "effect size (Cohen's h)", "value": h, "note": "statsmodels proportion_effectsize"},
        {"quantity": "users per arm", "value": math.ceil(n), "note": "statsmodels NormalIndPower.solve_power, two equal arms"},
        {"quantity": "days", "value": days_needed(plan, n), "note": "2 * users per arm / (daily_traffic * traffic_share), rounded up"},
    ]
    return pd.DataFrame(rows)


def offline_scenarios(plan: ABPlan, offline_rel_pct: float, low_pct: float, high_pct: float, factors=SCENARIO_FACTORS) -> pd.DataFrame:
    """Hypothetical online lifts = factor * the offline relative gain (its point and CI ends),
    with the users and days each would need; plus the factor at which the offline point gain
    would equal the MDE."""
    rows = []
    for factor in factors:
        for what, pct in (("CI low", low_pct), ("point", offline_rel_pct), ("CI high", high_pct)):
            lift = factor * pct / 100.0
            ok = math.isfinite(lift) and lift != 0 and 0 < plan.baseline_rate * (1 + lift) < 1
            _, n = sample_size(plan, lift) if ok else (math.nan, math.nan)
            rows.append({"hypothetical factor": factor, "offline gain": what, "offline relative gain %": pct,
                         "assumed online lift %": 100 * lift, "users per arm": math.ceil(n) if ok else None,
                         "days": days_needed(plan, n) if ok else None,
                         "note": "hypothetical: no offline-to-online factor is known; the test measures it"})
    frame = pd.DataFrame(rows)
    # only a positive offline gain can be scaled to a positive lift
    frame.attrs["factor_for_mde"] = 100 * plan.mde_relative / offline_rel_pct if offline_rel_pct > 0 else math.nan
    return frame


__all__ = ["SCENARIO_FACTORS", "ABPlan", "ab_plan_table", "days_needed", "offline_scenarios", "sample_size"]

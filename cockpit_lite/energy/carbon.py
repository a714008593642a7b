"""Energy units and carbon: J -> Wh / kWh -> gCO2eq for a carbon intensity the user states.

No network look-ups: the intensity is whatever the user passes (their grid, their supplier's
contract, their cloud region's published figure). The default is the world average for electricity
generation in 2023, 480 gCO2eq/kWh (Ember, "Global Electricity Review 2024"); a lower-carbon grid
can be 20-100 g, a coal-heavy one over 700 g. Data-centre overhead (PUE) is not included unless the
user passes ``pue``. ``Energy(carbon={"country": ...})`` reads a country's or region's intensity from
CodeCarbon's offline tables instead (``carbon_tables.py``).
"""

from __future__ import annotations

import math

#: gCO2eq per kWh, world average of electricity generation in 2023 (Ember, Global Electricity Review 2024)
DEFAULT_CARBON_INTENSITY_G_PER_KWH = 480.0
DEFAULT_CARBON_SOURCE = "world average 2023, Ember Global Electricity Review 2024"
J_PER_WH = 3600.0
J_PER_KWH = 3.6e6


def joules_to_wh(joules: float) -> float:
    return joules / J_PER_WH


def joules_to_kwh(joules: float) -> float:
    return joules / J_PER_KWH


def co2_grams(joules: float, intensity_g_per_kwh: float = DEFAULT_CARBON_INTENSITY_G_PER_KWH,
              pue: float = 1.0) -> float:
    """Grams of CO2-equivalent for ``joules`` drawn at the device, scaled by the facility's PUE."""
    return joules_to_kwh(joules) * pue * intensity_g_per_kwh


def check_intensity(intensity_g_per_kwh: float, pue: float = 1.0) -> None:
    if not (isinstance(intensity_g_per_kwh, (int, float)) and math.isfinite(intensity_g_per_kwh)
            and intensity_g_per_kwh >= 0):
        raise ValueError(f"carbon intensity must be a finite number of gCO2eq/kWh >= 0, got {intensity_g_per_kwh!r}")
    if not (isinstance(pue, (int, float)) and math.isfinite(pue) and pue >= 1.0):
        raise ValueError(f"PUE must be a finite number >= 1, got {pue!r}")


__all__ = ["DEFAULT_CARBON_INTENSITY_G_PER_KWH", "DEFAULT_CARBON_SOURCE", "joules_to_wh", "joules_to_kwh",
           "co2_grams", "check_intensity"]

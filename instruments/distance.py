"""Distance travelled from the initial parameters and the size of each update."""

from ._lines import LinesInstrument


class Distance(LinesInstrument):
    name = "distance"
    tab = "distances"
    title = "Distance from θ₀ and update size"
    group = "step size"
    keys = ("distance", "update_size")
    ylabel = "L2 norm"
    description = "||θ_t - θ_0||₂ and ||θ_{t+1} - θ_t||₂ (the update actually taken)."

    def label(self, key: str) -> str:
        return {"distance": "distance ||θ_t − θ₀||", "update_size": "update size ||d||"}[key]

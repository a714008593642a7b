"""Energy of each training step, measured from the hardware counters and labelled with its provenance.

* :mod:`.rapl`: CPU package and DRAM counters (Linux powercap), read at step boundaries;
* :mod:`.nvml`: the GPU's cumulative counter (NVML), sampled by a thread, with CUDA events as step ends;
* :mod:`.attribution`: counter deltas -> steps, over windows with a stated error bound;
* :mod:`.carbon`: J -> Wh/kWh -> gCO2eq for a stated carbon intensity;
* :mod:`.estimate`: an opt-in TDP x utilisation estimate, always labelled ``estimated``;
* :mod:`.carbon_tables`, :mod:`.cpu_tdp`: carbon intensity by country/region and CPU TDPs from CodeCarbon's
  bundled tables (:mod:`.codecarbon_data` finds them; optional extra ``carbon``);
* :mod:`.zeus_counter`: Zeus's GPU counter where NVML cannot be used (when zeus is installed).

The quantity that uses them is ``cockpit_lite.quantities.energy.Energy`` (name ``"energy"``).
"""

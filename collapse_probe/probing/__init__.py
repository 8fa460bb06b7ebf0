"""Run images through a model and measure collapse: ``run`` (the probe) and ``result`` (ProbeResult)."""

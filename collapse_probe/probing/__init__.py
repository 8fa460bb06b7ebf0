"""Run images through a model and measure collapse: ``run`` (the probe), ``result`` (ProbeResult) and ``monitor``
(CollapseMonitor: the probe repeated on one fixed batch while a model trains)."""

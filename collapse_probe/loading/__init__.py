"""From a file to a model: read safely (``read``, ``safety``), decide the architecture (``infer``), build (``build``),
feed it images (``images``), and save our own models (``save``)."""

"""What the commands write: ``text`` (table / JSON / CSV), ``audit`` (report folders and verdict), ``figures``
(the paper's analyses)."""

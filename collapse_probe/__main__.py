"""``python -m collapse_probe ...`` is the same as the ``collapse-probe`` command."""
from .cli import main

main()

"""``python -m collapse_probe.train ARGS`` is ``collapse-probe train ARGS`` (also under torchrun)."""
import sys

from ..cli import main

main(["train", *sys.argv[1:]], prog_name="collapse-probe")

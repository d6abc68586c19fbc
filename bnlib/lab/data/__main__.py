"""``python -m bnlib.lab.data [--root DIR]``: download MNIST (if needed) and verify its checksums.

The command runs this module rather than the package itself, which the kit has already imported by the
time the command starts (running an imported module again is what Python warns about).
"""

import sys

from . import main

sys.exit(main())

"""`python -m raytrainer train CONFIG.yaml` — the same as the `raytrainer` console script."""

import sys

from raytrainer.cli import main

sys.exit(main())

"""``python -m samkernels.train`` == ``samkernels-train``."""
import sys

from samkernels.train.cli import main

sys.exit(main())

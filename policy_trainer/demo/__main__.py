"""`python -m policy_trainer.demo` (what `make demo` runs)."""

import sys

from policy_trainer.demo.run import main

sys.exit(main())

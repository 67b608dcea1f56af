import sys

from nexus_tune.cli import main

sys.exit(main())

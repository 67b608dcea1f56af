import sys

from nexus_tune.commands.cli import main

sys.exit(main())

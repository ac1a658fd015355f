import sys

from rgemma.cli import main

sys.exit(main())

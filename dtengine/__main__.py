import sys

from dtengine.cli import main

sys.exit(main())

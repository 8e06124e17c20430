import sys

from clpd.cli import main

sys.exit(main())

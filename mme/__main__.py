import sys

from mme.cli import main

sys.exit(main())

import sys

from kdzoo.cli import main

sys.exit(main())

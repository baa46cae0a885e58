import sys

from npmobile.cli import main

sys.exit(main())

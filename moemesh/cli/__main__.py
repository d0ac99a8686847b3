import sys

from moemesh.cli.main import main

sys.exit(main())

import sys

from sdserve_export.cli import main

sys.exit(main())

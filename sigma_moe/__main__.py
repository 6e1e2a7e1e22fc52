import sys

from sigma_moe.cli import main

sys.exit(main())

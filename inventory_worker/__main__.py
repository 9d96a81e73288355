import sys

from inventory_worker.cli import main

sys.exit(main())

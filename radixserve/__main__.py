import sys

from radixserve.engine.cli import main

sys.exit(main())

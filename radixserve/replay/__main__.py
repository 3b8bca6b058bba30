import sys

from radixserve.replay.cli import main

sys.exit(main())

import sys

from nvfp4kit.cli import main

sys.exit(main())

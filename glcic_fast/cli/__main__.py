import sys

from glcic_fast.cli.commands import main

sys.exit(main())

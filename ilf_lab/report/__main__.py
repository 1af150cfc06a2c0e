import sys

from ilf_lab.report.cli import main

sys.exit(main())

"""``python -m qsmprep`` runs the ``qsmprep`` command."""

import sys

from qsmprep.cli.run import main

sys.exit(main())

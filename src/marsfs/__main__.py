"""``python -m marsfs`` is the ``marsfs`` command."""

from marsfs.cli import main

raise SystemExit(main())

"""``python -m ordertrail`` runs the ``ordertrail`` command."""

from ordertrail.cli.main import cli

cli()

"""The ``ordertrail`` command."""

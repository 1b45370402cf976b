"""The ``alya`` command and its demo."""

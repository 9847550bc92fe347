"""One module per flowbeam pipeline: its options, ``build`` and ``run``."""

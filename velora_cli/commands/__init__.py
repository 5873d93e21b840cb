"""One module per ``velora`` command; shared options in ``options``, errors in ``errors``.

Every command module is imported by ``velora --help``, so none imports torch at module level.
"""

"""The storage room: the cache root and atomic writes (``cache``), output folders that are replaced only
when imprune wrote them and only once the new one is complete (``outputs``), content fingerprints of inputs
(``fingerprint``) and the provenance written with every artifact (``meta``). Imports nothing of imprune
but ``importance.errors``.
"""

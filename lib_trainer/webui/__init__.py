"""Host glue: the only package that knows the WebUI exists (host.py is the only file importing ``modules``)."""

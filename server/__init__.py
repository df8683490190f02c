"""The coordinator: party clients, the job runner, reports and the ``amalgam`` command line."""

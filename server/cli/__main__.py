"""``python -m amalgam.server.cli``: the ``amalgam`` command."""

from amalgam.server.cli import main

if __name__ == "__main__":
    raise SystemExit(main())

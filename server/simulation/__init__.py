"""Federations on this machine, for trying Amalgam out and for its tests and benchmarks: the
demo's three organizations (``amalgam demo``), a marketplace of N local parties (``amalgam
market``), a Flower deployment on loopback and Flower's simulation engine. The coordinator core
never imports this package; it runs parties itself, so it may import :mod:`amalgam.party`."""

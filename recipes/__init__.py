"""Shipped recipes (YAML). Installed as the package data ``sbn_surgery.recipes``."""

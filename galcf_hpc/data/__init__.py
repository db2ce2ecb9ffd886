"""Data: Galaxy10 class table, astroNN-format catalogs, synthetic galaxies, shards."""

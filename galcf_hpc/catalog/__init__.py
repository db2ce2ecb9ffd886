"""Catalog-wide counterfactuals: an MPI batch job (work units, resume) writing HDF5 part
files and one ``catalog.h5`` of virtual datasets over them. See docs/catalog.md."""

from pathlib import Path

from setuptools import find_packages, setup

version = {}
exec(Path("galcf_hpc/__init__.py").read_text().split("\n\n")[-1], version)

# torch is pinned to the release whose CPU build the CI machines carry; an open range
# would let pip resolve a multi-GB CUDA build on a fresh CPU machine. GPU sites install
# their own CUDA build first (docs/quickstart.md), which satisfies this pin's range.
setup(
    name="galcf-hpc",
    version=version["__version__"],
    description="Explainable galaxy-morphology classification with counterfactuals on HPC systems",
    long_description=Path("README.md").read_text() if Path("README.md").exists() else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["galcf_hpc", "galcf_hpc.*"]),
    package_data={"galcf_hpc": ["configs/*.yaml"], "galcf_hpc.report": ["templates/*.j2"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4,<=2.14.1",
        "numpy>=1.24",
        "FrEIA>=0.2",
        "h5py>=3.8",
        "pyyaml>=6.0",
        "scipy>=1.9",
        "pillow>=9.0",
        # the report page's template engine; small and pure Python, so required rather than in
        # the report extra (scripts/setup.sh installs the dev extra, not report)
        "jinja2>=3.0",
    ],
    extras_require={
        "synth": ["galsim>=2.5"],
        # catalog run on your own cutouts: FITS files (astropy) and .parquet lists (pyarrow);
        # PNG, JPEG and .csv need nothing more
        "cutouts": ["astropy>=5.0", "pyarrow>=10"],
        # catalog export: Parquet and CSV (pyarrow), FITS (astropy)
        "export": ["pyarrow>=14", "astropy>=6"],
        "report": ["matplotlib>=3.7", "scikit-learn>=1.3"],
        # DALI is one wheel per CUDA major version; both also run CPU-only pipelines.
        "dali-cuda13": ["nvidia-dali-cuda130>=2.0"],
        "dali-cuda12": ["nvidia-dali-cuda120>=2.0"],
        # mpi4py against the site's MPI (cluster modules); mpich adds a self-contained MPI
        # (mpiexec included) for laptops and CI.
        "mpi": ["mpi4py>=3.1"],
        # install with DS_BUILD_OPS=0: no CUDA extensions are compiled (the optimiser is torch's).
        # 0.17.2 brought the `torch_autocast` config section that bf16 training relies on (older
        # versions ignore it and train in fp32); 0.19.8 is the version tested here
        "deepspeed": ["deepspeed>=0.17.2"],
        "mpich": ["mpi4py>=3.1", "mpich"],
        # train.tensorboard: metrics also as TensorBoard event files
        "tensorboard": ["tensorboard>=2.14"],
        # ruff and import-linter: .ci/run lints and checks the import contracts before the
        # tests. ruff within one minor release: its formatter's style changes between them.
        # webdataset (the reference reader of the shard format) only checks, in tests, that
        # the shards are standard WebDataset tars: the package's loaders read them via the
        # DALI index files (docs/loaders.md). astropy and pyarrow (the cutouts and export
        # extras): the tests of FITS cutouts, .parquet lists and `catalog export`; pandas: the
        # tests read the exported tables as a pandas user would
        "dev": ["pytest>=7", "webdataset>=1.0", "scikit-image>=0.21", "galsim>=2.5", "matplotlib>=3.7",
                "scikit-learn>=1.3", "ruff~=0.17.6", "import-linter>=2.17,<3", "tensorboard>=2.14",
                "astropy>=6", "pyarrow>=14", "pandas>=2"],
    },
    entry_points={"console_scripts": ["galcf-hpc=galcf_hpc.cli:main"]},
)

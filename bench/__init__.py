"""Side-by-side benchmarks of minibatch against DuckDB, Polars, pyarrow, ProcessPoolExecutor and Dask.

Run `python -m bench.run` from the repository root; see bench/README.md.
"""

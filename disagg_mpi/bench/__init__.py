"""`disagg-mpi bench`: the serving benchmark (workloads, load generator, metrics, report)."""

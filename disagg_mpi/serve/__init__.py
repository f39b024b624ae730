"""`disagg-mpi serve`: an OpenAI-compatible HTTP server on rank 0 of the MPI job."""

"""Process-level plumbing every stage shares: devices, the dask cluster, progress sinks, the CPU
allocator. Modules here import nothing of safe-cache but errors; each imports its own heavy
dependencies (torch, distributed), so importing one never pulls in the others."""

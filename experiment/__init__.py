"""What makes one run: typed configs, the workdir, metric writers, error kinds."""

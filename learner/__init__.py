"""The training process: objectives (pure functions), the update, checkpoints, the record scheduler, the local and Ray drivers, experiments, benchmarks and the CLI."""

"""The one training loop (Ray Train's train_loop_per_worker, DistillModule) and what it reads and
writes: the student's rows from the shards (data) or from live teachers (online_data), and MLflow
tracking.

Modules: data, loop, online_data, tracking. They import only from this folder and the ones below it
(losses, blocks, storage, core, modalities); docs/design.md, "Layers", and the import-linter
contracts in pyproject.toml."""

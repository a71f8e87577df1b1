"""What is on disk: teacher checkpoints, the stages' typed artifacts and index files, the teachers'
Arrow shards and the dataset store.

Modules: artifacts, datastore, shards, teacher_checkpoint. They import only from this folder and the
ones below it (core, modalities); docs/design.md, "Layers", and the import-linter contracts in
pyproject.toml."""

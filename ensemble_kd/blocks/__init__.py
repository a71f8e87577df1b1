"""The methods' building blocks, shared by the losses, the data layer and the stages: CRD's memories
and negative sampling, GACD's PGD views, DFND selections, replayable views, the teacher bank and the
labelled subset.

Modules: adversarial, bank, labels, memory, selection, views. They import only from this folder and
the ones below it (storage, core, modalities); docs/design.md, "Layers", and the import-linter
contracts in pyproject.toml."""

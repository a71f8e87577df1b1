"""What a command runs and in what order: the pipeline composing the stages for `ensemble-kd run`
and each verb, the report (summary.json, the table, its plots), the export of a student, Ray Tune
sweeps, the plan (arms -> per-seed trials) and the config cross-checks against the registries.

Modules: checks, export, pipeline, plan, plots, report, sweep. They import only from this folder and
the ones below it (stages, training, losses, blocks, storage, core, modalities); docs/design.md,
"Layers", and the import-linter contracts in pyproject.toml."""

"""The bottom layer, imported by everything above: the config schema, the project's errors, atomic
files, collectives, device/AMP/seeding, paired statistics, Ctrl-C handling, row access to parted
columns, a user's plugins and starting Ray (with every worker's setup hook).

Modules: checkpoint, config, console, devices, dist, errors, interrupts, plugins, raycluster, rows,
stats. They import only from this folder and the ones below it (modalities); docs/design.md,
"Layers", and the import-linter contracts in pyproject.toml."""

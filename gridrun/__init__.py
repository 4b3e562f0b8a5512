"""The grid family: a grid of the pipeline's runs (grids/*.json) on a local pool or on Slurm, resumable, under the
entry point grid.py. Import rule: these modules import the pipeline's root modules and each other; no pipeline
module imports them (tests/test_layers.py checks). Import a module by name, e.g. `from gridrun.plan import expand`
or `from gridrun import plan as grid_plan`.
"""

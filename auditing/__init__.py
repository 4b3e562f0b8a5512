"""The audit family: the worst-case privacy audit of every defense (docs/audit.md) under the entry point audit.py:
its plan and settings, training and pruning steps, leave-one-out attacks, the tuner of a defense's setting, and the
report. Import rule: these modules import the pipeline's root modules and each other; no pipeline module imports
them (tests/test_layers.py checks). Import a module by name, e.g. `from auditing.plan import Plan` or
`from auditing import plan as audit_plan`.
"""

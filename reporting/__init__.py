"""The report family: the results table from the runs' records and logs (results), and the report with its tables
and figures (report, tables, figures), under the entry point summarize.py. Import rule: these modules import the
pipeline's root modules and each other; no pipeline module imports them (tests/test_layers.py checks). Import a
module by name, e.g. `from reporting.results import collect` or `from reporting import tables as report_tables`.
"""

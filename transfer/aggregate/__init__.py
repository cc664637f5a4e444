"""The aggregator: a sweep's job folders read into comparison tables, contrasts and plots.

Modules, each importing only those above it: columns (what a column is called, which way it sorts, how it is
written), stats (t intervals and tests), jobs (records into the jobs frame), tables (the comparison, grouped over
seeds), contrasts (paired differences, the best per strategy), readable (legend labels, error bars kept within
what a quantity can take, plain log ticks), plots (views of the comparison), output (writing them all, or none;
`aggregate`), __main__ (`python -m transfer.aggregate`). Callers import from the submodules.
"""

"""Configuration, torch-free by contract: everything a command line is checked against before anything heavy runs.

compose (Hydra composition, sweep expansion, the Plan), checks (check_config, calling each group's checks;
init_from's chain), folders (output folders, resume comparison), schema (the top Config, registered with
Hydra), preflight (files, model folders, the GPU), search (an Optuna study's space and settings); and per
group its config classes, checks and spec table: objective, strategy, model, data, hardware, optimizer.
"""

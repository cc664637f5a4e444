"""Configuration, torch-free: the schema, its checks, start-up preflight."""

"""The KFP DAG, its compile/submit/run-local commands, and the `ctv2v` command line (the outermost layer)."""

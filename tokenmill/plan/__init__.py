"""tokenmill plan: predict ms/token, tokens/s and $/1M tokens on any accelerator, from the memory
wall up. Data files (hardware.yaml, models.yaml, efficiency.yaml, validation.csv) live beside the
code; `perf.predict(Deployment(...))` is the entry point, `cli.plan_app` the command line."""

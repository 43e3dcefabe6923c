"""The offline study: whether WARP works on the offline testbed, with the paper's controls, the testbed's
limit and intervals over training seeds and prompts. `arms.py` says what is compared, `runner.py` trains
and evaluates it, `report.py` turns the per-prompt tables into the claims table and plots;
`python -m bench.study --help` runs it."""

"""Shared helpers of the benchmarks in scripts/ (one script per scenario) and of the tests:
percentiles, the JSON result file, and the launcher that starts a real server process."""

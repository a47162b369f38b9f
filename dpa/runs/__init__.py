"""Orchestration: the demo, the sweep, the benchmarks and the loopback runner (a server and a device in one go)."""

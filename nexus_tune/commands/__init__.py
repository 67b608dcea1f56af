"""The commands layer: the `nexus-tune` CLI and what sits on top of the engine and the core
(profiling sweeps, calibration, replays, the load generator, simulate/tune/plan front ends, tables,
plots and progress). Nothing below imports it."""

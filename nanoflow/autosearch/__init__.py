"""The auto-search: profile each operation on this device, measure interference, solve the two-stage MILP for a
nano-batch plan, confirm candidates by measuring (`nanoflow profile`, `nanoflow tune`)."""

"""The cost model: the paper's equations, the hardware it runs on, measured GEMM peak, the roofline report and plan predictions
(measuring only; nothing here runs a step)."""

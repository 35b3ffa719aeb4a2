"""Mixed precision under a bits-per-weight budget: measure -> artifact -> allocate -> apply.

`measure` (each quantizable Linear's calibrated output error under every candidate option, and
how a layer's error reaches the model's output), `allocate` (one option per layer, exact
multiple-choice knapsack), `apply` (the plan as a Recipe with per-layer overrides).
"""

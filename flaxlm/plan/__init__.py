"""`flaxlm plan`: the layout that fits and runs fastest on a given pod, chosen by compiling.

- `candidates`: the layouts (mesh within and across slices, remat, gradient accumulation,
  attention kernel, scanned layers), which divide the model and the batch, which could fit;
- `analytic`: a step time from the config alone, to order the candidates worth compiling;
- `compile`: compiling them ahead of time (or on the devices at hand), in parallel, cached;
- `planner`: the pipeline from a config and a target to ranked, priced candidates;
- `output`: the table, the plot, JSON lines, the ready command and the chosen config;
- `command`: the `flaxlm plan` subcommand.

The step-time model of a compiled candidate is `flaxlm.step_time`.
"""

"""Planning: where each part of a model goes, from shapes and dtypes alone.

- `module_sizes`: one walk of a model (`ModelScan`) and the sizes accelerate's functions
  report (`compute_module_sizes`, `get_max_layer_size`, ...);
- `budgets`: what each device may hold (`get_max_memory`, `get_balanced_memory`);
- `planner`: `infer_auto_device_map`, written as named steps over `tree` (the module tree),
  `queue` (the entries waiting, and the room kept for the largest layer), `tied_groups`
  (tied parameters placed together) and `fallback` (`fallback_allocate`);
- `reports`: the warnings and messages the planner gives besides the map;
- `checks`: `check_device_map` and `clean_device_map`;
- `strategies`: "auto", "balanced", "balanced_low_0" and "sequential" device maps.

The public names are re-exported by `bigmodel.utils` (and `bigmodel` for
`infer_auto_device_map`).
"""

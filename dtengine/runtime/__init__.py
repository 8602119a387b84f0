"""The ground floor: what every run needs and no model knows about. Imports nothing else of dtengine.

errors (one hierarchy, one-line messages), config (YAML + dotted overrides into a schema passed in), device
(device, precision, seeded and sample-keyed random numbers), io (atomic files and folders, output folders),
checkpoint (weights_only save / load / list / keep-k), logging (metrics JSONL + TensorBoard, step windows,
progress bar, loss plot) and flags (environment switches, read once).
"""

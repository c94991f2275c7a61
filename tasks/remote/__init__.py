"""The Ray layer: the grid's editor and evaluator actors (`actors.py`; plain objects in a
local cell) and anchor statistics as sharded Ray tasks (`anchor_ray.py`). The math and the
stream they run live in the rest of `tasks/`, which imports no Ray."""

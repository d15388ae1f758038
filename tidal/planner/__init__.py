"""The SLA planner: a pure core (observations -> decisions) and its adapters (see types.py)."""

"""Performance profiles: measured step times of one model on one device (`tidal profile`).

`profile.py` (the data, its file format and its arithmetic) imports no torch and no engine code,
so the simulator, the deployment config (per-role defaults, `tidal.deploy.config`) and the planner
read profiles cheaply; `sweep.py` measures them on a real engine; `report.py` prints them.
"""

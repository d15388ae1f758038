"""The cluster commands: `tidal worker`, `tidal frontend` and `tidal planner`, one process each,
started by a cluster manager and meeting through etcd (discovery) and NATS (events, planner traffic).

    config.py         the `--config` file (a `cluster:` section + the deployment sections) and flags
    control.py        planner traffic over NATS: observations out of the frontend, flips back into it
    worker_main.py    one worker: TCP request socket, NATS events, zmq KV transfer, etcd registration
    frontend_main.py  router + OpenAI HTTP frontend over the workers etcd lists
    planner_main.py   the SLA planner on the frontend's observations; /metrics and /health
"""

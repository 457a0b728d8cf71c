"""Replication: the wire protocol (``protocol``: frames and typed messages) and the rules of the
conversation (``session``: serving and fetching state machines), both sans-I/O; framed
channels over trio streams (``channel``), the serving side (``server``) and the fetching side
(``fetch``), which only move bytes, call the volume and sleep."""

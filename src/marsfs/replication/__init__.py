"""Replication: the wire protocol (``protocol``, sans-I/O), framed channels over trio streams
(``channel``), the serving side (``server``) and the fetching side (``fetch``)."""

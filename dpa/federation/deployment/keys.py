"""Names shared by the ServerApp, the bridges and the launcher: run-config and node-config keys, the
instructions a message carries, and the files a bridge keeps. One owner, so that the three agree."""

from __future__ import annotations

__all__ = ["Node", "Run", "Do", "CLASS_SUMS", "LOAD_TAIL", "READ_TAIL", "SPLITFED", "ANSWERING", "TAIL_LOADS"]

CLASS_SUMS, SPLITFED = "class-sums", "splitfed"  # the recipes (run config "recipe")
READ_TAIL = "tail"  # the first half of a SplitFed round: each edge server's tail is read (Flower's train message)
LOAD_TAIL = "load-tail"  # the second half of a SplitFed round: the average goes back to every edge server
ANSWERING = "answering"  # a bridge's marker file while it answers (a fault drill waits for it)
TAIL_LOADS = "tail_loads.json"  # a bridge's record of the examples its edge server's tail had at each load


class Node:
    """``flower-supernode --node-config`` keys: which edge server this SuperNode stands beside."""

    EDGE_ID = "edge-id"  # int, the edge server's number in the federation
    EDGE_URL = "edge-url"  # its dpa serve, e.g. https://127.0.0.1:8443
    EDGE_CA = "edge-ca"  # the CA file its certificate is checked against ("" for the system's roots)
    EDGE_STATE = "edge-state"  # its state folder (the bridge reads its class-sum store there)
    ARTIFACTS = "artifacts"  # its export (the bridge needs the activation size)
    OPERATOR_TOKEN = "operator-token"  # a file with the bridge's operator token for GET/PUT /v1/tail
    BRIDGE_STATE = "bridge-state"  # the bridge's own folder (its tail-load record, its drill marker)
    DRILL_PAUSE_S = "drill-pause-s"  # fault drills only: wait this long before answering (0: never)
    DRILL_AT = "drill-at"  # ... before which answer: class-sums, tail or load-tail ("": every one)


class Run:
    """``flwr run --run-config`` keys (defaults in the app's pyproject.toml)."""

    RECIPE = "recipe"  # class-sums or splitfed
    EDGE_SERVERS = "edge-servers"  # how many edge servers must answer
    GALLERY_SIZE = "gallery-size"  # the class-sum gallery's rows (every edge server's --gallery-size)
    OUT = "out"  # where the ServerApp writes the gallery or tail, and its report
    ROUNDS = "rounds"  # SplitFed rounds (class sums: one collection)
    ROUND_TIMEOUT_S = "round-timeout-s"  # one attempt's wait for the edge servers' answers
    ATTEMPTS = "attempts"  # attempts per round: the edge servers that did not answer are asked again


class Do:
    """The instruction record of a message: ``msg.content[Do.RECORD][Do.WHAT]``."""

    # GLOBAL_STEPS: a SplitFed load's step for every edge server, by edge id (each bridge takes its own).
    RECORD, WHAT, GALLERY_SIZE, GLOBAL_STEPS = "do", "what", "gallery-size", "global-steps"

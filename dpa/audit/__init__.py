"""Privacy audits of DP-A: what an honest-but-curious edge server can learn (imports torch; not for devices)."""

__all__ = ["inversion", "membership"]

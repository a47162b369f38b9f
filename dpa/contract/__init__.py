"""The contract between device and edge server, and the ground every package stands on.

Wire format, messages, manifest, architecture table, device profiles, the onnxruntime-training shim, buffers,
atomic writes and finite checks. Imports nothing of ours.
"""

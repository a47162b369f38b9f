"""The floor under the contract: small tools every floor uses that are not part of what the device and the
server agree on: writing files whole (``atomic``), what this CPU is (``cpu``), finite-number checks
(``finite``). Nothing here imports anything of dpa's."""

"""Face data: the LFW folder loader and the synthetic identities the tests and the demo use."""

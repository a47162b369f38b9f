"""The federation on Flower's deployment runtime: a SuperLink, and a SuperNode beside each `dpa serve`."""

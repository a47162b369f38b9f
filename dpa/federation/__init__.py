"""Class sums over Flower (issue 25): many devices, several edge servers, one gallery."""

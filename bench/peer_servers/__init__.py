"""Peer servers of bench/peers.py, run inside their own virtual environments."""

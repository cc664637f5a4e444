"""Data: rows from files and the hub (sources.py), text cut into blocks (blocks.py), conversations
framed and masked for instruction tuning (chat.py), and the sequences, order and batches every
token objective trains on (sequences.py)."""

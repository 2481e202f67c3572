"""Graph passes, one per file, each named as it is named in a spec (`merge` <-> merge.py)."""

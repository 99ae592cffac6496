"""The trainer: the only part of fljob that imports torch, torchtitan or streaming."""

"""Atomic writes (formats live in `lowbit.export`)."""

"""Agents and trainers built on :mod:`acktr_kfe`: the supervised benchmark mode lives in ``agents.supervised``."""

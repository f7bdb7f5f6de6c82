"""Attention backends: each declares what it supports and why it cannot serve a call."""

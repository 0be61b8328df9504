"""Tests for the composite checkout."""

"""Thin command-line front ends over the edgeprefill library."""

"""ocomp runtime."""

"""edgeprune.service."""
